"""Recommendation feedback: the store (positions, replacement, errors), the replayed report
against hand-computed CTRs and Wilson intervals, the API routes and their counter, the CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from agent.app.feedback import KINDS, STAGES, FeedbackKind, FeedbackStore, Stage, wilson_interval
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import RequestError, UnknownRecommendationError
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.fake import FakeModel
from agent.settings import Settings
from ui.api import ApiSettings, create_app
from ui.cli import app as cli_app

CLIENT = {"Authorization": "Bearer client-key"}
OPERATOR = {"Authorization": "Bearer operator-key"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    s = FeedbackStore(tmp_path / "feedback.sqlite3")
    yield s
    s.close()


def _log(store: FeedbackStore) -> None:
    """The small log every replay test uses (dataset "shop" unless noted):

    rec A fast      [i1, i2, i3]  impressions i1 i2 i3, click i2, purchase i2
    rec B refined   [j1, j2]      impressions j1 j2, click j1
    rec C explained [k1, k2, k3]  impressions k1 k2 k3
    rec E fast      [m1, m2]      click m1, no impression (a client that forgot them)
    rec D fast      [x1]          dataset "other": impression x1, click x1
    """
    store.log_recommendation("A", "shop", "u1", ["i1", "i2", "i3"], "fast")
    store.log_recommendation("B", "shop", "u2", ["j1", "j2"], "refined")
    store.log_recommendation("C", "shop", "u3", ["k1", "k2", "k3"], "explained")
    store.log_recommendation("E", "shop", "u5", ["m1", "m2"], "fast")
    store.log_recommendation("D", "other", "u4", ["x1"], "fast")
    events: list[tuple[str, str, FeedbackKind]] = [
        ("A", "i1", "impression"), ("A", "i2", "impression"), ("A", "i3", "impression"), ("A", "i2", "click"),
        ("A", "i2", "purchase"), ("B", "j1", "impression"), ("B", "j2", "impression"), ("B", "j1", "click"),
        ("C", "k1", "impression"), ("C", "k2", "impression"), ("C", "k3", "impression"), ("E", "m1", "click"),
        ("D", "x1", "impression"), ("D", "x1", "click"),
    ]
    for rec, item, kind in events:
        store.record(rec, item, kind)


# ---- the interval ------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (2, 10, 0.0567, 0.5098),   # textbook value (Wilson 1927; e.g. Brown, Cai & DasGupta 2001)
    (3, 8, 0.1368, 0.6943),
    (0, 3, 0.0, 0.5615),       # k = 0: low 0, high z^2 / (n + z^2) = 3.8415 / 6.8415
    (5, 5, 0.5655, 1.0),       # k = n: the mirror image, 1 - 3.8415 / 8.8415
])
def test_wilson_interval_matches_hand_computed_values(k: int, n: int, low: float, high: float) -> None:
    ci = wilson_interval(k, n)
    assert ci is not None
    assert ci == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_has_no_answer_without_trials_and_refuses_more_successes_than_trials() -> None:
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match=r"successes must be in \[0, trials\]; got 4 of 3"):
        wilson_interval(4, 3)


def test_the_closed_sets_match_their_literals() -> None:
    assert STAGES == get_args(Stage) == ("fast", "refined", "explained", "precomputed")
    assert KINDS == get_args(FeedbackKind) == ("impression", "click", "purchase")


# ---- the store ---------------------------------------------------------------------------------


def test_replay_gives_hand_computed_ctr_by_stage_and_position(store: FeedbackStore) -> None:
    _log(store)
    r = store.replay("shop")
    assert r.dataset == "shop"
    assert list(r.by_stage) == ["fast", "refined", "explained"]  # no precomputed answers logged
    fast, refined, explained = r.by_stage["fast"], r.by_stage["refined"], r.by_stage["explained"]
    # fast: A and E; 3 shown items (A's), click events i2 and m1; m1 never had an impression, so it
    # is an orphan click and only i2 counts: CTR 1/3, Wilson (0.0615, 0.7923), m1's position 1 unclicked
    assert (fast.recommendations, fast.impressions, fast.clicks, fast.purchases) == (2, 3, 1, 1)
    assert (fast.clicks_without_impression, fast.repeat_clicks) == (1, 0)
    assert fast.ctr == pytest.approx(1 / 3) and fast.purchase_rate == pytest.approx(1 / 3)
    assert fast.ctr_ci95 == pytest.approx((0.0615, 0.7923), abs=5e-5)
    assert [(p.position, p.impressions, p.clicks) for p in fast.by_position] == [(1, 1, 0), (2, 1, 1), (3, 1, 0)]
    assert refined.ctr == 0.5 and refined.clicks_without_impression == 0
    assert [(p.position, p.ctr) for p in refined.by_position] == [(1, 1.0), (2, 0.0)]
    assert explained.ctr == 0.0 and explained.ctr_ci95 == pytest.approx((0.0, 0.5615), abs=5e-5)
    assert explained.purchase_rate == 0.0
    # overall: 8 shown items, 2 of them clicked (i2, j1; m1 is an orphan): CTR 2/8, Wilson (0.0715, 0.5907);
    # dataset "other" left out. Positions: 1 = i1 j1 k1 (j1 clicked), 2 = i2 j2 k2 (i2), 3 = i3 k3
    o = r.overall
    assert (o.recommendations, o.impressions, o.clicks, o.purchases, o.clicks_without_impression) == (4, 8, 2, 1, 1)
    assert o.ctr == 0.25 and o.ctr_ci95 == pytest.approx((0.0715, 0.5907), abs=5e-5)
    assert [(p.position, p.impressions, p.clicks) for p in o.by_position] == [(1, 3, 1), (2, 3, 1), (3, 2, 0)]
    assert o.by_position[0].ctr == pytest.approx(1 / 3)
    everything = store.replay()  # + D: x1 shown and clicked
    assert everything.dataset is None
    assert (everything.overall.recommendations, everything.overall.impressions, everything.overall.clicks) == (5, 9, 3)
    assert store.replay("nobody").overall.recommendations == 0 and store.replay("nobody").by_stage == {}


def test_orphan_and_repeat_clicks_are_reported_beside_a_ctr_that_never_exceeds_one(store: FeedbackStore) -> None:
    store.log_recommendation("r", "shop", "u", ["a", "b", "c"], "fast")
    for item, kind in [("a", "impression"), ("a", "impression"), ("b", "impression"), ("a", "click"),
                       ("a", "click"), ("a", "click"), ("c", "click"), ("c", "click")]:
        store.record("r", item, kind)  # type: ignore[arg-type]
    s = store.replay().overall
    # 3 impression events, 5 click events (counting events, CTR would be 5/3 = 167%).
    # Shown items: a, b (a's second impression is the same shown item) -> impressions 2.
    # Clicks: a once (its 2nd and 3rd clicks are repeats: 2); c was never shown (2 orphans) -> clicks 1.
    # 1 + 2 + 2 = 5 click events; CTR 1/2; Wilson(1, 2): centre 0.5, half
    # 1.96 / (1 + 3.8415/2) * sqrt(0.25/2 + 3.8415/16) = 0.67106 * 0.60423 = 0.40547 -> (0.0945, 0.9055)
    assert (s.impressions, s.clicks, s.repeat_clicks, s.clicks_without_impression) == (2, 1, 2, 2)
    assert s.ctr == 0.5 and s.ctr_ci95 == pytest.approx((0.0945, 0.9055), abs=5e-5)
    assert [(p.position, p.impressions, p.clicks, p.ctr) for p in s.by_position] == [(1, 1, 1, 1.0), (2, 1, 0, 0.0)]


def test_replacing_a_recommendation_moves_positions_and_stage(store: FeedbackStore, tmp_path: Path) -> None:
    store.log_recommendation("r1", "shop", "u1", ["a", "b", "c"], "fast")
    assert store.record("r1", "b", "impression") == 2
    assert store.record("r1", "b", "click") == 2
    store.log_recommendation("r1", "shop", "u1", ["c", "b", "d"], "refined")  # the LLM's answer arrives
    assert store.record("r1", "c", "click") == 1
    assert store.record("r1", "d", "impression") == 3
    ev = store.record_event("r1", "b", "purchase", at=1_700_000_000.0)
    assert (ev.position, ev.stage, ev.at) == (2, "refined", 1_700_000_000.0)
    with pytest.raises(RequestError, match="'a' was not shown"):  # gone from the list shown last
        store.record("r1", "a", "click")
    r = store.replay()
    assert r.overall.recommendations == 1 and list(r.by_stage) == ["fast", "refined"]
    assert r.by_stage["fast"].recommendations == 0 and r.by_stage["refined"].recommendations == 1
    assert (r.by_stage["fast"].impressions, r.by_stage["fast"].clicks) == (1, 1)
    assert r.by_stage["refined"].clicks_without_impression == 1  # c was clicked, its impression never logged
    with sqlite3.connect(tmp_path / "feedback.sqlite3") as c:
        created, updated, stage, items = c.execute(
            "SELECT created_at, updated_at, stage, items FROM recommendations").fetchone()
        rows = c.execute("SELECT item_id, kind, position, stage FROM feedback ORDER BY id").fetchall()
    assert created <= updated and stage == "refined" and json.loads(items) == ["c", "b", "d"]
    assert rows == [("b", "impression", 2, "fast"), ("b", "click", 2, "fast"), ("c", "click", 1, "refined"),
                    ("d", "impression", 3, "refined"), ("b", "purchase", 2, "refined")]


def test_unknown_ids_and_unshown_items_are_refused_with_the_field_and_the_fix(store: FeedbackStore) -> None:
    store.log_recommendation("r1", "shop", "u1", ["a", "b", "c"], "explained")
    with pytest.raises(UnknownRecommendationError) as e:
        store.record("nope", "a", "click")
    assert e.value.message == "recommendation_id 'nope' not found: send the id returned by POST /v1/next-item"
    assert (e.value.param, e.value.code, e.value.status) == ("recommendation_id", "unknown_recommendation", 404)
    with pytest.raises(RequestError) as e:
        store.record("r1", "zz", "click")
    assert e.value.message == "item_id 'zz' was not shown in recommendation 'r1'; shown: a, b, c"
    assert (e.value.param, e.value.code) == ("item_id", "item_not_shown")
    with pytest.raises(RequestError) as e:
        store.record("r1", "a", "like")  # type: ignore[arg-type]
    assert e.value.param == "kind"
    with pytest.raises(ValueError, match="stage must be one of fast, refined, explained, precomputed; got 'slow'"):
        store.log_recommendation("r2", "shop", "u1", ["a"], "slow")
    assert store.replay().overall.clicks == 0  # nothing refused was stored


def test_concurrent_writers_lose_nothing(store: FeedbackStore) -> None:
    for n in range(200):
        store.log_recommendation(f"r{n}", "shop", "u", ["a", "b"], "fast")

    def work(first: int) -> None:
        for n in range(first, first + 50):
            store.record(f"r{n}", "a", "impression")

    threads = [threading.Thread(target=work, args=(first,)) for first in range(0, 200, 50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.replay().overall.impressions == 200


def test_forget_user_drops_what_was_shown_to_them(tmp_path: Path) -> None:
    rt = Runtime(Settings(workspace=tmp_path, embedder="hashing-64"))
    items = [CatalogItem(item_id=f"i{n}", title=f"item {n}") for n in range(4)]
    rt.store.add_items("shop", items)
    t = datetime(2011, 1, 1, tzinfo=UTC)
    rt.store.add_events("shop", [BehaviorEvent(user_id=u, item_id=f"i{n}", event_type="purchase", quantity=1,
                                               timestamp=t.replace(day=n + 1)) for u in ("u1", "u2") for n in range(3)])
    rt.feedback.log_recommendation("r1", "shop", "u1", ["i3"], "fast")
    rt.feedback.log_recommendation("r2", "shop", "u2", ["i3"], "fast")
    rt.feedback.record("r1", "i3", "impression")
    svc = ShopLensService(rt, use_model=False)
    assert asyncio.run(svc.forget_user("shop", "u1")) == 3
    report = svc.feedback_report("shop")
    assert (report.overall.recommendations, report.overall.impressions) == (1, 0)
    with pytest.raises(UnknownRecommendationError, match="'r1' not found"):
        rt.feedback.record("r1", "i3", "click")


# ---- runtime and service -----------------------------------------------------------------------


def test_the_runtime_opens_one_store_in_the_workspace_and_reopens_it_after_close(tmp_path: Path) -> None:
    rt = Runtime(Settings(workspace=tmp_path, embedder="hashing-64"))
    assert rt.feedback is rt.feedback and rt.feedback.path == tmp_path / "feedback.sqlite3"
    rt.feedback.log_recommendation("r", "shop", "u", ["a"], "precomputed")
    svc = ShopLensService(rt, use_model=False)
    assert asyncio.run(svc.record_feedback("r", "a", "click")) == 1
    first = rt.feedback
    asyncio.run(rt.aclose())
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        first.replay()
    assert rt.feedback is not first and rt.feedback.replay().by_stage["precomputed"].clicks_without_impression == 1


# ---- the API -----------------------------------------------------------------------------------


class FakeRuntime(Runtime):
    """The real runtime with a fake model that fails loudly if anything calls it."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.fake = FakeModel()

    async def connect_model(self) -> FakeModel:
        return self.fake


def _client(ws: Path) -> tuple[FakeRuntime, TestClient]:
    rt = FakeRuntime(Settings(workspace=ws, embedder="hashing-64", model_retries=0, model_cooldown_s=0))
    api = ApiSettings(api_keys="client-key", operator_keys="operator-key", rate_limit_rps=0, readyz_cache_s=0,
                      start_model=False)
    return rt, TestClient(create_app(rt, api))


def _counter(c: TestClient, kind: str, stage: str) -> float:
    line = f'shoplens_feedback_total{{kind="{kind}",stage="{stage}"}} '
    text = c.get("/metrics", headers=OPERATOR).text
    return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)


def test_the_api_records_feedback_counts_it_and_reports_it(tmp_path: Path) -> None:
    rt, client = _client(tmp_path)
    rec = "3f2b9c0d5e7a4b1c9d8e6f5a4b3c2d1e"
    with client as c:
        rt.feedback.log_recommendation(rec, "shop", "u1", ["a", "b", "c"], "fast")
        rt.feedback.log_recommendation(rec, "shop", "u1", ["b", "c", "a"], "explained")
        for item in ("b", "c", "a"):
            assert c.post("/v1/feedback", json={"recommendation_id": rec, "item_id": item, "kind": "impression"},
                          headers=CLIENT).status_code == 200
        r = c.post("/v1/feedback", headers=CLIENT, json={"recommendation_id": rec, "item_id": "c", "kind": "click",
                                                         "timestamp": "2024-05-01T12:00:00Z"})
        assert r.status_code == 200, r.text
        assert r.json() == {"recommendation_id": rec, "item_id": "c", "kind": "click", "position": 2,
                            "stage": "explained"}
        assert _counter(c, "impression", "explained") == 3.0 and _counter(c, "click", "explained") == 1.0
        assert _counter(c, "click", "fast") == 0.0

        report = c.get("/v1/feedback/report", params={"dataset": "shop"}, headers=OPERATOR)
        assert report.status_code == 200, report.text
        body = report.json()
        assert body["overall"]["impressions"] == 3 and body["overall"]["clicks"] == 1
        assert body["overall"]["ctr"] == pytest.approx(1 / 3)
        assert [p["clicks"] for p in body["by_stage"]["explained"]["by_position"]] == [0, 1, 0]
        assert c.get("/v1/feedback/report", headers=CLIENT).status_code == 403  # operator keys only
        assert c.post("/v1/feedback", json={"recommendation_id": rec, "item_id": "a", "kind": "click"}
                      ).status_code == 401
        doc = c.get("/openapi.json").json()
        assert {"/v1/feedback", "/v1/feedback/report"} <= set(doc["paths"])
        assert doc["components"]["schemas"]["FeedbackRequest"]["additionalProperties"] is False
    assert rt.fake.calls == []  # feedback never touches the model
    with sqlite3.connect(tmp_path / "feedback.sqlite3") as db:
        (at,) = db.execute("SELECT at FROM feedback WHERE kind = 'click'").fetchone()
    assert at == datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("body", "param", "code", "message"), [
    ({"recommendation_id": "0" * 32, "item_id": "a", "kind": "click"}, "recommendation_id", "unknown_recommendation",
     "recommendation_id '00000000000000000000000000000000' not found: send the id returned by POST /v1/next-item"),
    ({"recommendation_id": "r1", "item_id": "zz", "kind": "click"}, "item_id", "item_not_shown",
     "item_id 'zz' was not shown in recommendation 'r1'; shown: a, b"),
    ({"recommendation_id": "r1", "item_id": "a", "kind": "like"}, "kind", None, None),
    ({"recommendation_id": "r1", "item_id": "a", "kind": "click", "user_id": "u1"}, "user_id", None, None),
    ({"recommendation_id": "r" * 65, "item_id": "a", "kind": "click"}, "recommendation_id", None, None),
    ({"recommendation_id": "r1", "item_id": "a", "kind": "click", "timestamp": "yesterday"}, "timestamp",
     "invalid_timestamp", None),
    ({"recommendation_id": "r1", "item_id": "a", "kind": "click", "timestamp": 1e300}, "timestamp",
     "invalid_timestamp", None),
])
def test_the_api_refuses_bad_feedback_with_the_envelope(tmp_path: Path, body: dict[str, object], param: str,
                                                         code: str | None, message: str | None) -> None:
    rt, client = _client(tmp_path)
    with client as c:
        rt.feedback.log_recommendation("r1", "shop", "u1", ["a", "b"], "refined")
        r = c.post("/v1/feedback", json=body, headers=CLIENT)
        unknown = code == "unknown_recommendation"  # 404, as GET /v1/next-item/{id} answers it
        assert r.status_code == (404 if unknown else 422), r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == ("not_found_error" if unknown else "invalid_request_error")
        if code is not None:
            assert err["code"] == code
        if message is not None:
            assert err["message"] == message
        assert sum(_counter(c, k, s) for k in KINDS for s in STAGES) == 0.0


# ---- the CLI -----------------------------------------------------------------------------------


def test_the_cli_prints_the_report_as_json_and_as_tables(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "feedback.sqlite3")
    _log(store)
    expected = store.replay("shop")
    store.close()
    runner = CliRunner()
    r = runner.invoke(cli_app, ["eval", "feedback", "--dataset", "shop", "--json", "--workspace", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads(expected.model_dump_json())
    r = runner.invoke(cli_app, ["eval", "feedback", "--dataset", "shop", "--workspace", str(tmp_path)],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    fast = next(x for x in lines if x.startswith("│ fast "))
    cells = [c.strip() for c in fast.strip("│").split("│")]
    assert cells == ["fast", "2", "3", "1", "1", "33.3%", "6.1% - 79.2%", "33.3%", "1", "0"]
    total = next(x for x in lines if x.startswith("│ all "))
    assert [c.strip() for c in total.strip("│").split("│")][5:7] == ["25.0%", "7.1% - 59.1%"]
    assert "CTR by shown position" in r.stdout and "33.3% (1/3)" in r.stdout


def test_the_cli_says_when_nothing_was_logged(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli_app, ["eval", "feedback", "--workspace", str(tmp_path)])
    assert r.exit_code == 0 and "no recommendations logged" in r.output
