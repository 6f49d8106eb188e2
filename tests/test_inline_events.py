"""Inline events count once per event id, by the store's rule, so a retried or repeated batch does
not double the user's history in the prompt (issue 17).

The rule is the store's: the client's `event_id` if given, else the content hash of the event as
stored (`agent.app.events.as_stored`), the first one kept. The prompts are read from the fake
model's call log; the answer's `meta.notes` says how many inline events were dropped.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from agent.app.service import ShopLensService
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.settings import Settings
from tests.test_pii_every_task import (
    CATALOG,
    DS,
    PII_TEXT,
    T0,
    USER,
    FakeRuntime,
    _events,
    _prompts,
)
from ui.api import ApiSettings, create_app

WEB = "web-1"  # a user the store has not seen, answered from inline events


def _runtime(ws: Path, **kw: Any) -> FakeRuntime:
    r = FakeRuntime(Settings(workspace=ws, embedder="hashing-64", permutations=1, n_candidates=6,
                             model_retries=0, model_cooldown_s=0, **kw))
    r.store.add_items(DS, [CatalogItem(item_id=i, title=t, price=2.5, category="home") for i, t in CATALOG.items()])
    r.store.add_events(DS, _events())
    return r


@pytest.fixture
def rt(tmp_path: Path) -> FakeRuntime:
    return _runtime(tmp_path)


def _inline(rt: FakeRuntime, user_id: str = WEB) -> list[BehaviorEvent]:
    """The stored user's events as a client would send them inline (no client event ids)."""
    return [BehaviorEvent.model_validate(e.model_dump(exclude={"event_id"}) | {"user_id": user_id})
            for e in rt.store.user_events(DS, USER)]


async def _ask(rt: FakeRuntime, user_id: str, events: list[BehaviorEvent] | None) -> tuple[list[str], list[str]]:
    """(the prompts of one next-item answer, its notes)."""
    svc = ShopLensService(rt)
    n = len(rt.fake.calls)
    pred = await svc.next_item(DS, user_id, events=events, config=svc.next_item_config(k=3))
    assert not pred.meta.degraded, pred.meta
    prompts = _prompts(rt.fake.calls[n:])
    assert prompts, "no model call: nothing compared"
    return prompts, pred.meta.notes


async def test_a_batch_sent_twice_in_one_request_gives_the_prompts_of_sending_it_once(rt: FakeRuntime) -> None:
    once = _inline(rt)
    prompts_once, notes_once = await _ask(rt, WEB, once)
    prompts_twice, notes_twice = await _ask(rt, WEB, once + once)
    assert prompts_twice == prompts_once
    assert not [n for n in notes_once if "inline events" in n]
    dropped = [n for n in notes_twice if n.startswith("inline events:")]
    assert dropped == [f"inline events: {len(once)} of {2 * len(once)} repeated an earlier event_id (the client's, "
                       "else the content hash of an identical event) and were counted once"], notes_twice
    # a partial retry (the last three again, interleaved) is the same history too
    retried = once[:5] + once[-3:] + once[5:]
    prompts_retry, notes_retry = await _ask(rt, WEB, retried)
    assert prompts_retry == prompts_once
    assert any(n.startswith(f"inline events: 3 of {len(retried)} ") for n in notes_retry), notes_retry


async def test_inline_events_equal_to_stored_ones_are_not_doubled(rt: FakeRuntime) -> None:
    stored_prompts, _ = await _ask(rt, USER, None)  # the stored user, read from the store
    mine = _inline(rt, USER)
    assert [e.event_id for e in mine] == [e.event_id for e in rt.store.user_events(DS, USER)]  # the store's ids
    for events in (mine, mine + mine):
        prompts, _ = await _ask(rt, USER, events)
        assert prompts == stored_prompts


def test_events_that_differ_only_in_event_id_are_kept(rt: FakeRuntime) -> None:
    svc = ShopLensService(rt)
    base = {"user_id": WEB, "item_id": "22423", "event_type": "purchase", "timestamp": T0, "quantity": 1}
    a, b = (BehaviorEvent.model_validate(base | {"event_id": i}) for i in ("order-1", "order-2"))
    notes: list[str] = []
    assert [e.event_id for e in svc.history(DS, WEB, [a, b], notes=notes)] == ["order-1", "order-2"]
    assert notes == []
    # the same client id twice is one event, whatever the content: the first is kept, as the store keeps it
    later = BehaviorEvent.model_validate(base | {"event_id": "order-1", "quantity": 5})
    kept = svc.history(DS, WEB, [a, b, later], notes=notes)
    assert [(e.event_id, e.quantity) for e in kept] == [("order-1", 1), ("order-2", 1)]
    assert notes and notes[0].startswith("inline events: 1 of 3 "), notes


async def test_inline_ids_are_the_ids_the_store_gives_with_pseudonyms_and_masking(tmp_path: Path) -> None:
    """With caller ids pseudonymised and review text masked, an inline event is keyed as
    POST /v1/events would store it, so a retried review counts once."""
    rt = _runtime(tmp_path, pseudonymise_key=SecretStr("k" * 32), mask_pii=True)
    svc = ShopLensService(rt)
    raw = [{"user_id": "web-7", "item_id": "85123A", "event_type": "review", "rating": 5, "review_text": PII_TEXT,
            "timestamp": T0.isoformat()},
           {"user_id": "web-7", "item_id": "22423", "event_type": "purchase", "timestamp": T0.isoformat(),
            "event_id": "client-9"}]
    ingested = await svc.ingest_events(DS, raw)
    inline = [BehaviorEvent.model_validate(r) for r in raw]
    notes: list[str] = []
    hist = svc.history(DS, svc.stored_id("web-7"), inline + inline, notes=notes)
    assert sorted(e.event_id for e in hist) == sorted(ingested.event_ids)
    assert len(notes) == 1 and notes[0].startswith("inline events: 2 of 4 "), notes


def test_the_api_counts_a_retried_inline_batch_once_and_says_so(rt: FakeRuntime) -> None:
    auth = {"Authorization": "Bearer k"}
    batch = [e.model_dump(mode="json", exclude={"event_id"}) for e in _inline(rt)]
    with TestClient(create_app(rt, ApiSettings(api_keys="k", rate_limit_rps=0, readyz_cache_s=0))) as c:
        def ask(events: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
            n = len(rt.fake.calls)
            r = c.post("/v1/next-item", json={"dataset": DS, "user_id": WEB, "k": 3, "events": events}, headers=auth)
            assert r.status_code == 200, r.text
            return r.json(), _prompts(rt.fake.calls[n:])

        once, prompts_once = ask(batch)
        twice, prompts_twice = ask(batch + batch)
    assert prompts_twice == prompts_once and prompts_once
    assert [i["item_id"] for i in twice["items"]] == [i["item_id"] for i in once["items"]]
    assert any(n.startswith(f"inline events: {len(batch)} of {2 * len(batch)} ") for n in twice["meta"]["notes"])
    assert not any(n.startswith("inline events:") for n in once["meta"]["notes"])


async def test_posted_events_move_the_dataset_end_and_keep_the_catalogue(rt: FakeRuntime,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """After POST /v1/events the dataset's end (churn's default as-of) is read again, the
    catalogue is not (events never change it; rereading it per write slowed every task under
    load), and a batch of duplicates changes nothing."""
    svc = ShopLensService(rt)
    catalog, end = svc.state.catalog(DS), svc.state.dataset_end(DS)
    reads: list[str] = []
    real_items = rt.store.items
    monkeypatch.setattr(rt.store, "items", lambda ds: reads.append(ds) or real_items(ds))
    later = end + timedelta(days=30)
    batch = [{"user_id": f"late-{i}", "item_id": "22423", "event_type": "purchase", "timestamp": later.isoformat(),
              "event_id": f"late-{i}"} for i in range(400)]  # enough to move the 99.5% quantile
    out = await svc.ingest_events(DS, batch)
    assert out.stored == 400
    assert svc.state.dataset_end(DS) == later
    assert svc.state.catalog(DS) is catalog and reads == []
    svc.state.dataset_ends[DS] = end  # a stale value: a batch of duplicates must not drop it
    assert (await svc.ingest_events(DS, batch)).duplicates == 400
    assert svc.state.dataset_end(DS) == end
