"""Amazon 2018 "Industrial_and_Scientific" 5-core as preprocessed by MiniOneRec
(AkaliKong/MiniOneRec), 2016-10 .. 2018-11.

`Industrial_and_Scientific.item.json.gz`: `{item_id: {title, description, brand, categories}}`.
`valid_*.csv.gz`, `test_*.csv.gz`: one sliding-window prediction case per row
(`user_id, history_item_title, item_title, history_item_id, item_id, ...`), history <= 10 items
oldest first; test is later in time than valid. No timestamps.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
from pathlib import Path
from typing import Literal

from agent.ingest._common import (
    DATA_HINT,
    SYNTHETIC_NOTE,
    LoadResult,
    RowSink,
    open_text,
    resolve_file,
    sequence_events,
)
from agent.ingest.report import LoadReport

DATASET = "amazon-industrial"
SUBDIR = "amazon-industrial"
ITEM_FILE = "Industrial_and_Scientific.item.json.gz"
SPLITS: tuple[Literal["valid", "test"], ...] = ("valid", "test")
_MAX_DESCRIPTION = 20_000  # CatalogItem.description bound


def _split_file(data_dir: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    for folder in (data_dir / SUBDIR, data_dir):
        hits = sorted(folder.glob(f"{split}_Industrial_and_Scientific*.csv.gz"))
        if hits:
            return hits[0]
    raise FileNotFoundError(
        f"{data_dir / SUBDIR / (split + '_Industrial_and_Scientific_*.csv.gz')} not found; "
        f"{DATA_HINT}"
    )


def _id_list(raw: str) -> list[str]:
    """`"[3437, 642]"` -> `["3437", "642"]`."""
    value = ast.literal_eval(raw.strip() or "[]")
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a list of item ids, got {raw!r}")
    return [str(v).strip() for v in value]


def _description(raw: object) -> str | None:
    """The item json stores descriptions as a Python list literal: join its strings."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    text = raw
    if raw.lstrip().startswith("["):
        try:
            parts = ast.literal_eval(raw)
            if isinstance(parts, list):
                text = " ".join(str(p) for p in parts)
        except (ValueError, SyntaxError):
            pass
    text = " ".join(text.split())
    return text[:_MAX_DESCRIPTION] or None


def read_industrial_cases(
    data_dir: Path, split: Literal["valid", "test"]
) -> list[tuple[str, list[str], str]]:
    """Read the MiniOneRec prediction cases of one split.

    Args:
        data_dir: the shared data folder (holding `amazon-industrial/`) or that folder itself.
        split: "valid" or "test".

    Returns:
        One `(user_id, history item ids oldest first (<= 10), target item id)` per CSV row, in
        file order (4,532 valid / 4,533 test rows in the shared copy; a user has one row per
        position of a sliding window).

    Raises:
        FileNotFoundError: the split file is not there.
        ValueError: unknown split, or a row whose ids do not parse (message names path:row).
    """
    path = _split_file(data_dir, split)
    cases: list[tuple[str, list[str], str]] = []
    with open_text(path) as fh:
        for row, rec in enumerate(csv.DictReader(fh), start=1):
            try:
                history = _id_list(rec["history_item_id"])
                target = rec["item_id"].strip()
                user = rec["user_id"].strip()
            except (KeyError, ValueError, SyntaxError, AttributeError) as e:
                raise ValueError(f"{path}:row {row}: cannot read ids: {e}") from e
            if not user or not target:
                raise ValueError(f"{path}:row {row}: empty user_id or item_id")
            cases.append((user, history, target))
    return cases


def merge_windows(sequence: list[str], history: list[str], target: str) -> tuple[list[str], bool]:
    """Extend a user's sequence with one sliding-window case.

    The case is consistent when its history is the tail of the sequence so far: then only the
    target is new. Otherwise the longest suffix of `sequence` that is a prefix of
    `history + [target]` is overlapped and the rest appended.

    Returns:
        (the extended sequence, whether the case was consistent).
    """
    window = [*history, target]
    if not sequence:
        return window, True
    if history and sequence[-len(history):] == history:
        return [*sequence, target], True
    for k in range(min(len(sequence), len(window)), 0, -1):
        if sequence[-k:] == window[:k]:
            return [*sequence, *window[k:]], False
    return [*sequence, *window], False


def load_amazon_industrial(data_dir: Path) -> LoadResult:
    """Load the Industrial_and_Scientific catalogue and each user's purchase sequence.

    Valid and test rows are overlapping windows of the same per-user sequences: each user's
    sequence is rebuilt once from all their rows (valid first, then test), each interaction
    appearing once, and becomes `purchase` events at synthetic times 2018-01-01 UTC + n days
    (only the order is real).

    Args:
        data_dir: the shared data folder (holding `amazon-industrial/`) or that folder itself.

    Returns:
        LoadResult with 3,686 items (title, description, brand; no categories) and the events
        of ~3,285 users. Report rows are CSV rows (valid rows first, then test rows numbered on).

    Raises:
        FileNotFoundError: a file is not there.
        ValueError: a malformed row (see `read_industrial_cases`).
    """
    report = LoadReport(dataset=DATASET)
    sink = RowSink(report)
    item_path = resolve_file(data_dir, SUBDIR, ITEM_FILE)
    with gzip.open(item_path, "rt", encoding="utf-8") as fh:
        raw_items = json.load(fh)
    for n, (item_id, rec) in enumerate(raw_items.items(), start=1):
        rec = rec if isinstance(rec, dict) else {}
        sink.item(
            n,
            item_id=item_id,
            title=" ".join(str(rec.get("title") or "").split()),
            description=_description(rec.get("description")),
            brand=(str(rec.get("brand") or "").strip()[:200] or None),
            category=(str(rec.get("categories") or "").strip() or None),
        )

    sequences: dict[str, list[str]] = {}
    first_row: dict[str, int] = {}
    inconsistent = 0
    splits_of: dict[str, set[str]] = {}
    row = 0
    for split in SPLITS:
        for user, history, target in read_industrial_cases(data_dir, split):
            row += 1
            report.rows_read += 1
            first_row.setdefault(user, row)
            splits_of.setdefault(user, set()).add(split)
            sequences[user], ok = merge_windows(sequences.get(user, []), history, target)
            inconsistent += not ok
    unknown: set[str] = set()
    for user, seq in sequences.items():
        unknown |= sequence_events(sink, first_row[user], user, seq)
    both = sum(len(s) == 2 for s in splits_of.values())
    report.notes += [
        f"{len(sequences)} users, {both} of them in both valid and test: each user's sequence is "
        "rebuilt once from the overlapping windows (valid then test), each interaction once",
        f"{inconsistent} rows did not continue their user's sequence and were overlap-merged",
        f"no timestamps in the data: {SYNTHETIC_NOTE}",
        "items before a user's first valid/test window (the train split) are not in these files",
        "catalogue categories are empty in this preprocessing",
        f"{len(unknown)} event item ids are missing from the item json",
    ]
    return sink.result()
