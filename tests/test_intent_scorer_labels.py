"""Hostile cases (issue 19): an intent answer served by the fine-tuned encoder must not say it is
the baseline's, and a cold-start answer keeps the scorer the caller asked for."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.tasks.intent import IntentService

T0 = datetime(2024, 3, 1, 12, tzinfo=UTC)
CATALOG = {i: CatalogItem(item_id=i, title=f"Red shoes {i}", category="shoes") for i in ("A", "B")}
EVENTS = [BehaviorEvent(user_id="u", item_id="A", event_type=t, timestamp=T0 + timedelta(minutes=k))
          for k, t in enumerate(["view", "cart"])]


class StubEncoder:
    """Stands in for EncoderScorer: always P = 0.9, horizon 48."""

    horizon_h = 48.0
    trained = SimpleNamespace()

    def check_horizon(self, h: float) -> None:
        pass

    def predict(self, *a: Any, **kw: Any) -> float:
        return 0.9


def _ask(scorer: str, events: list[BehaviorEvent] = EVENTS, item: str = "A") -> Any:
    svc = IntentService(None, scorer=scorer, encoder=StubEncoder())  # type: ignore[arg-type]
    return asyncio.run(svc.predict("u", item, events, CATALOG, horizon_hours=48.0))


def test_bert_answer_without_model_does_not_claim_the_baseline_probability() -> None:
    p = _ask("bert")
    assert p.probability_source == "bert" and p.probability == 0.9
    assert "baseline probability" not in (p.meta.degraded_reason or ""), p.meta.degraded_reason


def test_cold_start_keeps_the_asked_scorer() -> None:
    p = _ask("bert", events=[])
    assert p.cold_start and p.probability_source == "cold_start_base_rate"
    assert p.scorer == "bert" or any("bert" in n for n in p.meta.notes), (p.scorer, p.meta.notes)
