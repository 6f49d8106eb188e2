"""Dataset loaders and ingest into the event store.

A loader reads one real dataset (or a user's own file, `generic.load_generic`) into validated
`BehaviorEvent`s and `CatalogItem`s plus a `LoadReport` that counts every dropped row by
reason. `ingest` writes a `LoadResult` into an `EventStore`, idempotently.

    result = load_dataset("online-retail", Settings().data_dir)
    report = ingest(store, "online-retail", result)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from agent.data.store import EventStore
from agent.ingest._common import DATA_HINT, LoadResult, RowError
from agent.ingest.amazon_beauty import load_amazon_beauty
from agent.ingest.amazon_games import load_amazon_games
from agent.ingest.amazon_industrial import load_amazon_industrial
from agent.ingest.online_retail import load_online_retail
from agent.ingest.report import LoadReport
from agent.ingest.taobao import load_taobao

__all__ = [
    "LOADERS",
    "IngestReport",
    "LoadReport",
    "LoadResult",
    "RowError",
    "ingest",
    "load_dataset",
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
