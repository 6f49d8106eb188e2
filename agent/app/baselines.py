"""The task baselines: fitted once per (task, dataset, horizon), cached as JSON, or a hand-set
prior where a dataset cannot label enough rows.

A baseline is fitted at the dataset's end minus the horizon (the label window must lie inside
the data) and saved under ``<workspace>/tasks/<task>-<horizon>-<dataset>.json``; one file per
horizon, because the label depends on it. A dataset with too few (or one-class) labelled rows
gets the task's hand-set prior for that horizon only, and `ensure` returns the note that says so
(for `meta.notes`): a horizon the data cannot label must not change the answer at others.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Literal

from agent.data.store import EventStore
from agent.domain.schemas import CatalogItem
from agent.tasks.churn import default_churn_baseline
from agent.tasks.common import LogisticBaseline
from agent.tasks.intent import IntentService
from agent.tasks.rows import (
    SESSION_CUT,
    churn_rows,
    fit_churn_baseline,
    fit_intent_baseline,
    horizon_key,
    intent_rows,
    robust_end,
    session_intent_rows,
)
from agent.tasks.session_intent import default_session_baseline, fit_session_baseline

log = logging.getLogger(__name__)

Task = Literal["intent", "session_intent", "churn"]
PRIORS: dict[str, Callable[[], LogisticBaseline]] = {
    "intent": lambda: IntentService(None).baseline,
    "session_intent": default_session_baseline,
    "churn": default_churn_baseline,
}


def drop_fitted_baselines(folder: Path, dataset: str) -> list[Path]:
    """Delete the baselines cached for `dataset` (``<task>-<horizon>-<dataset>.json`` under
    `folder`): after an ingest they were fitted on old events. Returns the deleted paths."""
    pattern = re.compile(rf"^(intent|session_intent|churn)-[^-]+-{re.escape(dataset)}\.json$")
    gone = [p for p in folder.glob("*.json") if pattern.match(p.name)] if folder.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


class Baselines:
    """Fits, caches and hands out the intent, session-intent and churn baselines.

    Args:
        store: the event store the rows are built from.
        folder: where fitted baselines are cached (``<workspace>/tasks``).
        catalog: the dataset's catalogue (cached by the caller).
    """

    def __init__(self, store: EventStore, folder: Path, catalog: Callable[[str], dict[str, CatalogItem]]):
        self.store = store
        self.folder = folder
        self.catalog = catalog
        self.priors: dict[tuple[str, str, str], LogisticBaseline] = {}  # (task, dataset, horizon) -> prior

    def path(self, task: str, dataset: str) -> Path:
        return self.folder / f"{task}-{dataset}.json"

    def _prior(self, task: str, dataset: str, horizon: float | None) -> LogisticBaseline | None:
        return self.priors.get((task, dataset, horizon_key(task, horizon)))

    def intent(self, dataset: str, horizon_h: float = 48.0) -> LogisticBaseline:
        """The cached baseline for this horizon (hours), or one fitted at cut-off = dataset end -
        horizon and cached.

        Raises:
            ValueError: too few (or one-class) labelled pairs to fit one.
        """
        if (prior := self._prior("intent", dataset, horizon_h)) is not None:
            return prior
        path = self.path(f"intent-{horizon_key('intent', horizon_h)}", dataset)
        if path.exists():
            return LogisticBaseline.load(path)
        cutoff = robust_end(self.store, dataset) - timedelta(hours=horizon_h)
        rows = intent_rows(self.store, dataset, cutoff, horizon_h, self.catalog(dataset))
        bl = fit_intent_baseline(rows, f"{dataset} pairs at {cutoff:%Y-%m-%d %H:%M}, horizon {horizon_h:g} h")
        bl.save(path)
        return bl

    def session_intent(self, dataset: str, horizon_hours: float | None = None) -> LogisticBaseline:
        """The cached baseline, or one fitted on every session whose label window ends before the
        dataset's end (cut after the first 3 events) and cached.

        Raises:
            ValueError: too few (or one-class) labelled sessions to fit one.
        """
        if (prior := self._prior("session_intent", dataset, horizon_hours)) is not None:
            return prior
        hz = horizon_key("session_intent", horizon_hours)
        path = self.path(f"session_intent-{hz}", dataset)
        if path.exists():
            return LogisticBaseline.load(path)
        end = robust_end(self.store, dataset)
        rows = session_intent_rows(self.store, dataset, self.catalog(dataset), horizon_hours=horizon_hours, end=end)
        bl = fit_session_baseline(rows, f"{dataset} sessions ending before {end:%Y-%m-%d %H:%M}, cut "
                                  f"{SESSION_CUT}, label: purchase {hz}")
        bl.save(path)
        return bl

    def churn(self, dataset: str, horizon_days: int = 90) -> LogisticBaseline:
        """The cached RFM baseline for this horizon (days), or one fitted at as_of = dataset end -
        2 x horizon and cached.

        Raises:
            ValueError: too few (or one-class) labelled users to fit one.
        """
        if (prior := self._prior("churn", dataset, horizon_days)) is not None:
            return prior
        path = self.path(f"churn-{horizon_key('churn', horizon_days)}", dataset)
        if path.exists():
            return LogisticBaseline.load(path)
        as_of = robust_end(self.store, dataset) - timedelta(days=2 * horizon_days)
        rows = churn_rows(self.store, dataset, as_of, horizon_days, self.catalog(dataset))
        bl = fit_churn_baseline(rows, f"{dataset} users at {as_of:%Y-%m-%d}, horizon {horizon_days} d")
        bl.save(path)
        return bl

    def get(self, task: Task, dataset: str, horizon: float | None) -> LogisticBaseline:
        """The baseline of `task` at `horizon` (hours for the intents, days for churn; None: the
        task's default), fitting it if needed.

        Raises:
            ValueError: the dataset cannot label enough rows (see `ensure`).
        """
        if task == "intent":
            return self.intent(dataset, 48.0 if horizon is None else horizon)
        if task == "session_intent":
            return self.session_intent(dataset, horizon)
        return self.churn(dataset, 90 if horizon is None else int(horizon))

    async def ensure(self, task: Task, dataset: str, horizon: float | None) -> str | None:
        """Fit (or load) a baseline once, off the event loop. A dataset too small to fit one gets
        the task's hand-set prior at this horizon; the returned note says so (else None)."""
        key = (task, dataset, horizon_key(task, horizon))
        if key not in self.priors:
            try:
                await asyncio.to_thread(self.get, task, dataset, horizon)
                return None
            except ValueError as e:  # scikit-learn: no rows, or a single class
                log.warning("%s baseline for %s not fitted (%s); using the hand-set prior", task, dataset, e)
                self.priors[key] = PRIORS[task]()
        return f"{task} baseline: hand-set prior ({dataset!r} has too few labelled rows to fit one)"

    def forget(self, dataset: str) -> None:
        """After ingest or delete: priors are decided again (the data may now label enough rows)."""
        for key in [k for k in self.priors if k[1] == dataset]:
            self.priors.pop(key)
