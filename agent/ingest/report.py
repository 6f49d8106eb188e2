"""What a loader read, kept and dropped, with reasons. Nothing is dropped without a count."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadReport:
    """Counts of rows read, events and items kept, and rows dropped per reason.

    `examples` keeps the first few row numbers (1-based, header excluded) per drop reason so a
    user can open the file and look. `source` describes a user's own export (`load_generic`): the
    files, the mapping used (`ColumnMap` data, reusable as a mapping file), what became of every
    column, and where the times came from; empty for the built-in datasets.
    """

    dataset: str
    rows_read: int = 0
    events_kept: int = 0
    items_kept: int = 0
    duplicates_collapsed: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    def drop(self, reason: str, row: int | None = None, n: int = 1) -> None:
        """Count `n` rows dropped for `reason`; remember up to 5 example row numbers."""
        self.dropped[reason] += n
        if row is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < 5:
                ex.append(row)

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "dataset": self.dataset,
            "rows_read": self.rows_read,
            "events_kept": self.events_kept,
            "items_kept": self.items_kept,
            "duplicates_collapsed": self.duplicates_collapsed,
            "rows_dropped": self.rows_dropped,
            "dropped": dict(self.dropped.most_common()),
            "examples": self.examples,
            "notes": self.notes,
        }
        if self.source:
            d["source"] = self.source
        return d

    def summary(self) -> str:
        """Human-readable multi-line summary for the CLI."""
        lines = [
            f"{self.dataset}: read {self.rows_read:,} rows -> {self.events_kept:,} events, "
            f"{self.items_kept:,} items; {self.duplicates_collapsed:,} exact duplicates collapsed",
        ]
        for reason, n in self.dropped.most_common():
            ex = self.examples.get(reason)
            lines.append(f"  dropped {n:,}: {reason}" + (f" (e.g. rows {ex})" if ex else ""))
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.source.get("times"):
            lines.append(f"  times: {self.source['times']}")
        for what in ("columns", "catalog_columns"):
            if self.source.get(what):
                title = "columns" if what == "columns" else "catalogue columns"
                lines.append(f"  {title}:")
                lines.extend(f"    {col}: {role}" for col, role in self.source[what].items())
        return "\n".join(lines)
