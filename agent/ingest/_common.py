"""Pieces shared by the dataset loaders: the result type, file lookup, row validation, the
JSON-lines reader and the synthetic clock for sources without timestamps.

Every loader funnels its rows through `RowSink`, so a row is either kept as a validated
`BehaviorEvent` / `CatalogItem` or counted in the `LoadReport` with a reason and a row number.
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from agent.domain.schemas import MAX_TITLE_CHARS, BehaviorEvent, CatalogItem, one_line
from agent.domain.text import strip_markup
from agent.ingest.report import LoadReport

DATA_HINT = (
    "the real datasets live in ../shared/data beside the project checkout "
    "(Settings().data_dir, env SHOPLENS_DATA_DIR)"
)
# How many full row-error messages are copied into report.notes (all of them stay in
# LoadResult.errors); keeps the persisted ingest report small for a badly broken file.
MAX_ERROR_NOTES = 10
R_BAD_JSON = "line is not a JSON object"
# Synthetic clock for sources without timestamps: the n-th interaction of a user (0-based)
# happens SYNTHETIC_START + n days; only the order is real.
SYNTHETIC_START = datetime(2018, 1, 1, tzinfo=UTC)
SYNTHETIC_NOTE = ("synthetic ordinal times, the n-th interaction of a user at 2018-01-01 UTC + n days "
                  "(order is real, gaps are not)")


@dataclass(frozen=True)
class RowError:
    """One row that failed validation: 1-based row number, field path, pydantic message, and
    what the row was meant to be ("event" or "catalogue item")."""

    row: int
    field: str
    message: str
    what: str = "event"

    def __str__(self) -> str:
        return f"{self.what} row {self.row}: {self.field}: {self.message}"


@dataclass
class LoadResult:
    """What a loader produced.

    Attributes:
        events: validated events, unique by `event_id`, sorted stably by (user_id, timestamp).
        items: validated catalogue items, unique by `item_id`.
        report: rows read, kept, dropped per reason, exact duplicates collapsed, notes.
        errors: every validation failure with row number and field (the report counts them).
    """

    events: list[BehaviorEvent]
    items: list[CatalogItem]
    report: LoadReport
    errors: list[RowError] = field(default_factory=list)


def resolve_file(data_dir: Path | str, subdir: str, name: str) -> Path:
    """Find `name` under `data_dir/subdir` (the shared layout) or directly under `data_dir`.

    Raises:
        FileNotFoundError: neither exists; the message names the expected path.
    """
    data_dir = Path(data_dir)
    for candidate in (data_dir / subdir / name, data_dir / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{data_dir / subdir / name} not found; {DATA_HINT}")


def open_text(path: Path) -> TextIO:
    """Open a text file for reading, transparently gunzipping `*.gz`.

    UTF-8, with a leading byte-order mark (Excel's CSV export) removed; `newline=""` as the csv
    module wants.
    """
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def jsonl_rows(fh: Iterable[str], report: LoadReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSON-lines text, each with its 1-based line number.

    Blank lines are skipped; every other line counts in ``report.rows_read``, and one that is
    not a JSON object is dropped as `R_BAD_JSON` with its line number.
    """
    for row, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        report.rows_read += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            report.drop(R_BAD_JSON, row)
            continue
        yield row, rec


def sequence_events(sink: RowSink, row: int, user_id: str, item_ids: Sequence[str],
                    event_type: str = "purchase") -> set[str]:
    """Emit one event per item of a user's ordered sequence at the synthetic clock: the n-th
    (0-based) at `SYNTHETIC_START` + n days. For sources with an order and no timestamps.

    Returns:
        The item ids of kept events that are not (yet) in the sink's catalogue.
    """
    unknown: set[str] = set()
    for pos, item_id in enumerate(item_ids):
        ev = sink.event(row, user_id=user_id, item_id=item_id, event_type=event_type,
                        timestamp=SYNTHETIC_START + timedelta(days=pos))
        if ev is not None and not sink.has_item(ev.item_id):
            unknown.add(ev.item_id)
    return unknown


class RowSink:
    """Validates rows into events and items; counts every rejected row and exact duplicate.

    Events are keyed by `event_id` (the content hash when the source has none): a second event
    with the same id is an exact duplicate, counted in `report.duplicates_collapsed`.
    """

    def __init__(self, report: LoadReport):
        self.report = report
        self.errors: list[RowError] = []
        self.normalised: Counter[str] = Counter()  # rows whose text the schemas cleaned, by what
        self._events: dict[str, BehaviorEvent] = {}
        self._items: dict[str, CatalogItem] = {}

    def event(self, row: int, **fields: Any) -> BehaviorEvent | None:
        """Validate one event; returns it, or None when rejected or an exact duplicate."""
        try:
            ev = BehaviorEvent(**fields)
        except ValidationError as e:
            self.reject(row, e, "event")
            return None
        if isinstance(text := fields.get("review_text"), str) and strip_markup(text) != text:
            self.normalised["HTML tags or entities removed from review text"] += 1
        if ev.event_id in self._events:
            self.report.duplicates_collapsed += 1
            return None
        self._events[ev.event_id] = ev
        return ev

    def item(self, row: int, **fields: Any) -> CatalogItem | None:
        """Validate one catalogue item; a repeated `item_id` is dropped and counted. Text the
        schema normalised is counted too: markup removed, a title cut at a word."""
        try:
            it = CatalogItem(**fields)
        except ValidationError as e:
            self.reject(row, e, "catalogue item")
            return None
        if any(isinstance(v, str) and strip_markup(v) != v for v in fields.values()):
            self.normalised["HTML tags or entities removed from catalogue text"] += 1
        if isinstance(title := fields.get("title"), str) and len(one_line(strip_markup(title))) > MAX_TITLE_CHARS:
            self.normalised[f"titles cut at a word to {MAX_TITLE_CHARS} characters"] += 1
        if it.item_id in self._items:
            self.report.drop("duplicate item_id in catalogue (first kept)", row)
            return None
        self._items[it.item_id] = it
        return it

    def reject(self, row: int, exc: ValidationError, what: str) -> None:
        """Count a row that failed validation under its first error's field and type."""
        errs = exc.errors(include_url=False)
        for err in errs:
            loc = ".".join(str(p) for p in err["loc"]) or "row"
            self.errors.append(RowError(row, loc, err["msg"], what))
        first = errs[0]
        loc = ".".join(str(p) for p in first["loc"]) or "row"
        self.report.drop(f"invalid {what}: {loc} ({first['type']})", row)

    def fail(self, row: int, field: str, message: str, what: str = "event", kind: str = "value_error") -> None:
        """Count a row a loader rejected before validation (e.g. an unreadable timestamp), under
        the same reason a validation error on `field` would give."""
        self.errors.append(RowError(row, field, message, what))
        self.report.drop(f"invalid {what}: {field} ({kind})", row)

    def has_item(self, item_id: str) -> bool:
        return item_id in self._items

    def event_item_ids(self) -> set[str]:
        """The distinct item ids of the events kept so far."""
        return {e.item_id for e in self._events.values()}

    @property
    def n_events(self) -> int:
        return len(self._events)

    def result(self) -> LoadResult:
        """Freeze into a LoadResult: events sorted stably by (user_id, timestamp)."""
        events = sorted(self._events.values(), key=lambda e: (e.user_id, e.timestamp))
        items = list(self._items.values())
        self.report.events_kept = len(events)
        self.report.items_kept = len(items)
        for what, n in sorted(self.normalised.items()):
            self.report.notes.append(f"{n} rows: {what}")
        for err in self.errors[:MAX_ERROR_NOTES]:
            self.report.notes.append(f"rejected {err}")
        if len(self.errors) > MAX_ERROR_NOTES:
            self.report.notes.append(
                f"... and {len(self.errors) - MAX_ERROR_NOTES} more validation errors "
                "(all listed in LoadResult.errors)"
            )
        return LoadResult(events=events, items=items, report=self.report, errors=self.errors)
