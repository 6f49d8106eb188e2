"""Deprecated import path, kept while callers move: the task methods are `ShopLensService`'s
(`agent.app.service`), the labelled-row builders live in `agent.tasks.rows`, the baselines in
`agent.app.baselines`. Remove once `agent/chat/tools.py` imports from there."""

from __future__ import annotations

from agent.app.service import ShopLensService
from agent.tasks.rows import (
    INTENT_LOOKBACK_H,
    SESSION_CUT,
    ChurnRow,
    IntentRow,
    churn_rows,
    fit_churn_baseline,
    fit_intent_baseline,
    horizon_key,
    intent_rows,
    iter_user_events,
    robust_end,
    session_intent_rows,
)

TasksService = ShopLensService  # one facade: intent, churn, profile, audience are its methods

__all__ = [
    "INTENT_LOOKBACK_H", "SESSION_CUT", "ChurnRow", "IntentRow", "TasksService", "churn_rows", "fit_churn_baseline",
    "fit_intent_baseline", "horizon_key", "intent_rows", "iter_user_events", "robust_end", "session_intent_rows",
]
