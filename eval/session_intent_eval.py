"""Offline eval of session-level purchase intent on Taobao (`shoplens eval intent --session`).

Protocol (no leakage): a user's events are split into sessions at 30 min of inactivity. Each
session where the cut rule applies gives one case: the as-of time is 1 s after the session's k-th
event (`--cut k3`, the default) or after its first cart (`--cut first-cart`); features come only
from the user's events strictly before it; label = a purchase at or after it, later in the same
session (default) or within `--horizon-hours`. Whether a session qualifies depends only on its
events before the cut. Train rows: label windows that end before 2017-12-02 00:00 China time
(the logistic-regression baseline is fitted on them); test rows: cuts from then to the dataset's
end, label windows inside the data. Trivial baselines beside it: the training base rate, and
"has a cart in the session" (the training purchase rate of sessions with / without a cart).

Writes the same run folder as the other task evals (`eval.tasks_eval._binary_eval`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from agent.app.runtime import Runtime
from agent.settings import Settings
from agent.tasks.rows import SESSION_CUT, robust_end, session_intent_rows
from agent.tasks.session_intent import (
    SessionIntentService,
    SessionRow,
    check_cut_rule,
    fit_session_baseline,
)
from eval.tasks_eval import _binary_eval, intent_case_record

CHINA = timezone(timedelta(hours=8))
SESSION_SPLIT = datetime(2017, 12, 2, tzinfo=CHINA)  # train label windows end before; test cuts from here


def trivial_scores(train: Sequence[SessionRow], test: Sequence[SessionRow]) -> dict[str, list[float]]:
    """Two trivial scorers fitted on `train`, applied to `test`: the base rate (a constant) and
    "has a cart in the session" (the training purchase rate of sessions with / without one)."""
    def rate(rows: Sequence[SessionRow]) -> float:
        return sum(r.label for r in rows) / len(rows) if rows else 0.0

    base = rate(train)
    with_cart = rate([r for r in train if r.features.n_carts > 0]) if any(r.features.n_carts for r in train) else base
    no_cart = rate([r for r in train if r.features.n_carts == 0]) if any(not r.features.n_carts for r in train) else base
    return {"trivial: base rate": [base] * len(test),
            "trivial: has a cart in session": [with_cart if r.features.n_carts > 0 else no_cart for r in test]}


def run_session_intent_eval(settings: Settings, *, rule: str = SESSION_CUT, horizon_hours: float | None = None,
                            n_model: int = 60, seed: int = 0, out: Path | None = None, n_explain: int = 5,
                            budget_s: float | None = None, dataset: str = "taobao",
                            split: datetime = SESSION_SPLIT) -> Path:
    """Baseline on every test session; the model (verbalizer + blend) on a seeded sample of
    `n_model` test sessions with positives oversampled to 1/3. Returns the run folder.

    Raises:
        ValueError: a bad `rule` (before any data is read), or too few labelled sessions.
    """
    check_cut_rule(rule)
    rt = Runtime(settings)
    store = rt.store
    catalog = store.items(dataset)
    end = robust_end(store, dataset)
    train = session_intent_rows(store, dataset, catalog, rule=rule, horizon_hours=horizon_hours, end=split)
    test = session_intent_rows(store, dataset, catalog, rule=rule, horizon_hours=horizon_hours, start=split, end=end)
    hz = "session" if horizon_hours is None else f"{horizon_hours:g} h"
    base = fit_session_baseline(train, f"{dataset} sessions, label windows before {split:%Y-%m-%d %H:%M %z}, "
                                f"cut {rule}, label: purchase {hz}")

    async def predict(model: Any, r: SessionRow, explain: bool) -> dict[str, Any]:
        evs = store.user_events(dataset, r.user_id, before=r.cut)
        p = await SessionIntentService(model, base, explain=explain).predict(
            r.user_id, evs, catalog, as_of=r.cut, horizon_hours=horizon_hours, dataset=dataset)
        return intent_case_record(r.label, p, explain)

    return asyncio.run(_binary_eval(
        "session-intent", settings, test, base, lambda r: r.features.vector(), n_model, seed, out, predict, 1 / 3,
        ["session_intent.v1", "session_intent_explain.v1"],
        {"dataset": dataset, "cut_rule": rule, "label": f"purchase {hz}", "split": split, "test_end": end,
         "n_train": len(train), "train_positives": sum(r.label for r in train), "n_test": len(test),
         "test_positives": sum(r.label for r in test),
         "test_already_bought_in_session": sum(r.features.n_purchases > 0 for r in test),
         "sample": "positives oversampled to 1/3"}, n_explain, budget_s, extra_scorers=trivial_scores(train, test)))
