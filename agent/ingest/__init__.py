"""Dataset loaders and ingest into the event store.

A loader reads one real dataset (or a user's own file, `generic.load_generic`) into validated
`BehaviorEvent`s and `CatalogItem`s plus a `LoadReport` that counts every dropped row by
reason. `ingest` writes a `LoadResult` into an `EventStore`, idempotently.

    result = load_dataset("online-retail", Settings().data_dir)
    report = ingest(store, "online-retail", result)

    result = load_generic(Path("export.csv"), build_column_map(["event_time=timestamp"]), dataset="my-shop")
    report = ingest(store, check_dataset_name("my-shop"), result)   # the mapping is saved with it
    saved_mapping(store, "my-shop")                                 # ... and read back for reuse
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from agent.data.store import EventStore
from agent.domain.errors import RequestError
from agent.ingest._common import DATA_HINT, LoadResult, RowError
from agent.ingest.amazon_beauty import load_amazon_beauty
from agent.ingest.amazon_games import load_amazon_games
from agent.ingest.amazon_industrial import load_amazon_industrial
from agent.ingest.mapping import ColumnMap, column_map
from agent.ingest.online_retail import load_online_retail
from agent.ingest.report import LoadReport
from agent.ingest.taobao import load_taobao

__all__ = [
    "LOADERS",
    "IngestReport",
    "LoadReport",
    "LoadResult",
    "RowError",
    "check_dataset_name",
    "ingest",
    "load_dataset",
    "saved_mapping",
]

# name -> loader(data_dir). `data_dir` is the shared data folder (Settings().data_dir), whose
# per-dataset subfolders are described in ../shared/data/README.md.
LOADERS: dict[str, Callable[[Path], LoadResult]] = {
    "online-retail": load_online_retail,
    "amazon-games": load_amazon_games,
    "amazon-industrial": load_amazon_industrial,
    "amazon-beauty": load_amazon_beauty,
    "taobao": load_taobao,
}


def load_dataset(name: str, data_dir: Path) -> LoadResult:
    """Load one of the registered real datasets.

    Args:
        name: a key of `LOADERS` (online-retail, amazon-games, amazon-industrial,
            amazon-beauty, taobao).
        data_dir: the shared data folder, normally `Settings().data_dir` (../shared/data).

    Returns:
        The validated events (sorted by user, time), catalogue items and load report.

    Raises:
        ValueError: unknown dataset name (the message lists the valid ones).
        FileNotFoundError: `data_dir` or a dataset file is missing (the message names the path).
    """
    loader = LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(LOADERS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist; {DATA_HINT}")
    return loader(data_dir)


@dataclass
class IngestReport(LoadReport):
    """A LoadReport plus what the write did: new events vs events already in the store."""

    events_new: int = 0
    events_already_present: int = 0
    items_written: int = 0

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d.update(
            events_new=self.events_new,
            events_already_present=self.events_already_present,
            items_written=self.items_written,
        )
        return d

    def summary(self) -> str:
        return (
            super().summary()
            + f"\n  ingest: {self.events_new:,} new events, {self.events_already_present:,} "
            f"already present; {self.items_written:,} items written"
        )


# A dataset name is a folder name under <workspace>/indexes and a key in URLs: keep it plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_dataset_name(name: str) -> str:
    """`name` if it can name a user's own dataset.

    Raises:
        RequestError: not 1-64 letters, digits, ``.``, ``_`` or ``-`` (starting with a letter or
            digit), or the name of a built-in dataset (param ``name``).
    """
    if not _NAME.match(name):
        raise RequestError(f"dataset name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with "
                           "a letter or digit (e.g. my-shop)", param="name")
    if name in LOADERS:
        raise RequestError(f"{name!r} is a built-in dataset (load it with `shoplens ingest {name}`); give your "
                           "own data another --name", param="name")
    return name


def saved_mapping(store: EventStore, name: str) -> ColumnMap | None:
    """The column mapping last used to ingest `name` (saved in its ingest record), or None when
    the dataset was never ingested from a user's file."""
    record = store.last_ingest(name) or {}
    source = record.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("mapping"), dict):
        return None
    return column_map(source["mapping"], where=f"the mapping saved with {name!r}")


_T = TypeVar("_T")


def _batches(seq: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def ingest(
    store: EventStore,
    name: str,
    result: LoadResult,
    batch_size: int = 50_000,
    *,
    progress: bool = True,
) -> IngestReport:
    """Write a LoadResult into the store: items first, then events, one transaction per batch.

    Re-running is idempotent: events are keyed by (dataset, event_id) (a content hash) and
    inserted with INSERT OR IGNORE, so a second run adds 0 new events; items are upserted.
    The final report is also recorded in the store's ingest log.

    Args:
        store: the event store.
        name: dataset name the rows are stored under.
        result: what a loader returned.
        batch_size: rows per transaction (>= 1).
        progress: show a tqdm progress bar (rows written) on stderr.

    Returns:
        A copy of `result.report` with events_new / events_already_present / items_written.

    Raises:
        ValueError: batch_size < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    base = result.report
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LoadReport)}
    report = IngestReport(
        **{**fields, "dropped": Counter(base.dropped), "notes": list(base.notes),
           "examples": {k: list(v) for k, v in base.examples.items()}}
    )
    total = len(result.items) + len(result.events)
    with tqdm(total=total, desc=f"ingest {name}", unit="row", disable=not progress) as bar:
        for batch in _batches(result.items, batch_size):
            report.items_written += store.add_items(name, batch)
            bar.update(len(batch))
        for event_batch in _batches(result.events, batch_size):
            new = store.add_events(name, event_batch)
            report.events_new += new
            report.events_already_present += len(event_batch) - new
            bar.update(len(event_batch))
    store.record_ingest(name, report.to_dict())
    return report
