"""`shoplens eval next-item` on any stored dataset: the generic protocols, checked by hand.

A toy dataset is written into a temporary workspace's store, then evaluated through the CLI
(typer's CliRunner) with the hashing embedder (no model, no network). Popularity is known by
construction, so ranks and NDCG@10 are worked out below.
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.data.store import EventStore
from agent.domain.schemas import BehaviorEvent, CatalogItem
from eval.report import compute_metrics
from eval.runner import RunConfig, read_cases
from eval.store_protocols import (
    HeldOut,
    random_candidates,
    split_events,
    training_events,
    warm_only,
)
from ui.eval_cli import eval_app

T0 = datetime(2024, 1, 1, tzinfo=UTC)
# One word per title: the hashing embedder links no two items, so retrieval is popularity,
# co-visitation and similar users only.
TITLES = {"a": "Apple", "b": "Banana", "c": "Cherry", "d": "Damson", "e": "Elderberry", "f": "Feijoa",
          "g": "Guava", "h": "Huckleberry"}
# Background users buy one item each (too short to be evaluated): popularity a 6, b 5, c 4, d 3,
# e 2. Evaluated users (leave-one-out: the last item is held out); u4's f is bought by nobody else,
# so it is a cold target: u4 is skipped and counted, and u4's events stay training events.
EVALUATED = {"u1": "ga", "u2": "gc", "u3": "ghe", "u4": "gf"}


def _ev(user: str, item: str, minutes: int, kind: str = "purchase", basket: str | None = None) -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, event_type=kind,  # type: ignore[arg-type]
                         timestamp=T0 + timedelta(minutes=minutes), basket_id=basket)


def _toy_events() -> list[BehaviorEvent]:
    out, t = [], 0
    for item, count in {"a": 6, "b": 5, "c": 4, "d": 3, "e": 2}.items():
        for j in range(count):
            out.append(_ev(f"bg-{item}{j}", item, t := t + 1))
    for user, seq in EVALUATED.items():
        for item in seq:
            out.append(_ev(user, item, t := t + 1))
    return out


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace whose store holds the toy dataset ``toy`` (8 items, 24 users)."""
    monkeypatch.setenv("SHOPLENS_EMBEDDER", "hashing-4096")
    store = EventStore(tmp_path / "ws" / "shoplens.sqlite3")
    store.add_items("toy", [CatalogItem(item_id=i, title=t) for i, t in TITLES.items()])
    store.add_events("toy", _toy_events())
    store.close()
    return tmp_path / "ws"


def _eval(ws: Path, *args: str) -> tuple[dict[str, object], Path]:
    r = CliRunner().invoke(eval_app, ["next-item", "--dataset", "toy", "--users", "0", "--workspace", str(ws),
                                      *args])
    assert r.exit_code == 0, r.output
    run_dir = Path(r.output.strip().splitlines()[-1].removeprefix("run folder: "))
    return json.loads((run_dir / "metrics.json").read_text()), run_dir


def _ndcg(*ranks: int | None) -> float:
    """Mean NDCG@10 x100 of single-target cases at these 1-based ranks (None: not ranked)."""
    return 100 * sum(1 / math.log2(r + 1) if r and r <= 10 else 0.0 for r in ranks) / len(ranks)


def test_pop_on_the_whole_catalogue_by_hand(ws: Path) -> None:
    """Full catalogue, history items left out. Training counts: a 6, b 5, c 4, g 4, d 3, e 2, f 1
    and h 1 (u4's and u3's); no held-out item is counted (u1's a would make it 7). Ranks: u1's a
    1st, u2's c 3rd, u3's e 5th (g, h are history)."""
    m, run_dir = _eval(ws, "--protocol", "leave-one-out", "--candidates", "full", "--ranker", "pop")
    assert m["n_cases"] == 3
    assert m["ndcg@10"] == pytest.approx(_ndcg(1, 3, 5), abs=1e-4)  # 62.8951
    assert m["hr@1"] == pytest.approx(100 / 3, abs=1e-4) and m["hr@5"] == 100.0
    assert m["mrr"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 5) / 3, abs=1e-4)
    # the served generator's top 20 holds every item with a training count (its popularity source)
    assert m["candidate_recall@20"] == 100.0
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["fitted_on"]["skipped_users"] == {"fewer than 2 items (consecutive repeats collapsed)": 20,
                                                 "target never in the training events (cold item)": 1}
    assert run_dir.parent == ws / "runs"  # under the workspace, not the project tree
    report = (run_dir / "report.md").read_text()
    assert "NDCG@10 = 62.90 %" in report and "candidate recall@20 = 100.00 %" in report
    assert "Units: NDCG@K, HR@K, MRR" in report


def test_candidate_recall_by_hand(ws: Path) -> None:
    """The served generator's top 3 with the default weights (3 users are too few to train):
    for history g, co-visitation (g -> h in u3's, g -> f in u4's training sequence) and similar
    users (u3, u4) lift f and h far above popularity's a (0.1 weight): top 3 = f, h, a, so u1's a
    is retrieved and u2's c is not; for u3 (g, h bought, excluded) f, then a, b: e is not.
    1 of 3 = 33.33 %."""
    m, run_dir = _eval(ws, "--protocol", "leave-one-out", "--candidates", "full", "--n-candidates", "3",
                       "--ranker", "pop")
    assert {r["user"]: r["candidate_hit"] for r in read_cases(run_dir)} == {"u1": True, "u2": False, "u3": False}
    assert m["candidate_recall@3"] == pytest.approx(100 / 3, abs=1e-4)
    assert m["ndcg@10"] == pytest.approx(_ndcg(1, 3, 5), abs=1e-4)  # pop ranks the whole catalogue anyway


def test_served_pipeline_without_the_model_by_hand(ws: Path) -> None:
    """The served pipeline ranked by its popularity source alone answers the whole catalogue as the
    API does: its own top 20, history purchases excluded: the same ranks as pop (1, 3, 5). The
    default fusion runs on the same cases."""
    single, _ = _eval(ws, "--protocol", "leave-one-out", "--candidates", "full", "--ranker", "pipeline",
                      "--no-llm", "--source", "popularity")
    assert single["ndcg@10"] == pytest.approx(_ndcg(1, 3, 5), abs=1e-4)
    assert single["candidate_recall@20"] == 100.0
    fused, run_dir = _eval(ws, "--protocol", "leave-one-out", "--candidates", "full", "--ranker", "pipeline",
                           "--no-llm")
    assert fused["n_cases"] == 3 and fused["valid_rate"] == 100.0 and fused["candidate_recall@20"] == 100.0
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["pipeline"]["use_llm_ranking"] is False and cfg["ranker"] == "pipeline"


def test_retrieved_candidates_are_the_served_answer(ws: Path) -> None:
    """--candidates retrieved ranks exactly what the service answers for the same history without
    a candidate list (POST /v1/next-item with no candidates, the model off)."""
    from agent.app.runtime import Runtime
    from agent.app.service import ShopLensService
    from agent.settings import load_settings

    m, run_dir = _eval(ws, "--protocol", "leave-one-out", "--candidates", "retrieved", "--n-candidates", "3",
                       "--ranker", "pop")
    store = json.loads((run_dir / "config.json").read_text())["fitted_on"]["pipeline_store"]
    svc = ShopLensService(Runtime(load_settings(workspace=Path(store))), use_model=False)

    async def served(user: str) -> set[str]:
        history = [_ev(user, i, n) for n, i in enumerate(EVALUATED[user][:-1])]
        pred = await svc.next_item("toy", user, events=history, config=svc.next_item_config(k=3, use_model=False))
        return {it.item_id for it in pred.items}

    recs = read_cases(run_dir)
    for rec in recs:
        assert set(rec["candidates"]) == asyncio.run(served(rec["user"]))
        assert rec["retrieved"] == rec["candidate_hit"]
    hits = {r["user"]: r["candidate_hit"] for r in recs}
    assert hits == {"u1": True, "u2": False, "u3": False}  # as in test_candidate_recall_by_hand
    assert m["candidate_recall@3"] == pytest.approx(100 / 3, abs=1e-4) and m["retrieval_recall@20"] == m[
        "candidate_recall@3"]
    asyncio.run(svc.runtime.aclose())


def test_an_invalid_run_leaves_no_folder(ws: Path) -> None:
    out = ws / "runs" / "mine"
    for args, message in (
        (["--dataset", "toy", "--protocol", "llmrank"], "--protocol llmrank exists only for the shared data"),
        (["--dataset", "toy", "--candidates", "bm25"], "--candidates bm25: --protocol leave-one-out takes"),
        (["--dataset", "toy", "--protocol", "temporal", "--cutoff", "soon"], "--cutoff 'soon'"),
        (["--dataset", "toy", "--min-history", "5", "--ranker", "pop"], "no user qualifies"),
    ):
        r = CliRunner().invoke(eval_app, ["next-item", *args, "--workspace", str(ws), "--out", str(out)])
        assert r.exit_code == 2 and message in r.output, r.output
        assert not (ws / "runs").exists() and not out.exists()
    r = CliRunner().invoke(eval_app, ["next-item", "--dataset", "toy", "--ranker", "pop", "--workspace", str(ws)])
    assert r.exit_code == 2 and "--n-candidates 20: the training events of toy hold 8 items" in r.output
    assert not (ws / "runs").exists()


def test_unknown_dataset_names_the_datasets_that_exist(ws: Path) -> None:
    r = CliRunner().invoke(eval_app, ["next-item", "--dataset", "my-shop", "--workspace", str(ws)])
    assert r.exit_code == 2
    assert "--dataset my-shop: no such dataset" in r.output and "datasets there: toy" in r.output
    assert "shoplens ingest --events FILE --name my-shop" in r.output
    assert not (ws / "runs").exists()


def test_default_ranker_depends_on_the_protocol() -> None:
    """The built-in protocols keep their default (fused, as published); a stored dataset's generic
    protocols default to the served pipeline."""
    assert RunConfig().ranker == "fused"
    assert RunConfig(dataset="amazon-industrial", protocol="full").ranker == "fused"
    assert RunConfig(dataset="online-retail", protocol="leave-last-basket").ranker == "fused"
    assert RunConfig(dataset="online-retail", protocol="leave-last-basket", candidates="retrieved").ranker == "pipeline"
    assert RunConfig(dataset="my-shop", protocol="leave-one-out").ranker == "pipeline"
    assert RunConfig(dataset="my-shop", protocol="temporal", ranker="pop").ranker == "pop"


def test_split_rules_by_hand() -> None:
    by_user = {
        # leave-one-out collapses the repeat of b: target b, history x a (not x a b)
        "u": [_ev("u", "x", 1, "view"), _ev("u", "a", 2, "view"), _ev("u", "b", 3, "view"), _ev("u", "b", 4)],
        # two baskets; the last (o2: c, d) is held out with everything from its time on
        "v": [_ev("v", "a", 1, basket="o1"), _ev("v", "x", 2, "view"), _ev("v", "c", 5, basket="o2"),
              _ev("v", "d", 5, basket="o2"), _ev("v", "e", 6, "view")],
        "w": [_ev("w", "a", 1, "view")],  # too short for any protocol
    }
    loo = split_events(by_user, "leave-one-out")
    assert loo.cases["u"].target == "b" and loo.cases["u"].history_items == ("x", "a")
    assert loo.cases["v"].target == "e" and set(loo.skipped.values()) == {1}
    basket = split_events(by_user, "leave-last-basket")
    assert basket.cases["v"].relevant == ("c", "d") and basket.cases["v"].history_items == ("a", "x")
    # no basket id: the purchases at the last purchase's time; the view of b before it is history
    assert basket.cases["u"].relevant == ("b",) and basket.cases["u"].history_items == ("x", "a", "b")
    assert basket.skipped == {"no purchase": 1}
    # temporal: test period from minute 4: u's first item after it that is new is none (b again)
    cut = T0 + timedelta(minutes=4)
    tmp = split_events(by_user, "temporal", cutoff=cut)
    assert "u" not in tmp.cases and tmp.cases["v"].target == "c" and tmp.cases["v"].history_items == ("a", "x")
    assert tmp.skipped == {"no new item after the cut-off": 1, "no event after the cut-off": 1}
    # training: held-out parts removed (leave-one-out), the test period removed for all (temporal)
    train = training_events(by_user, {"v": basket.cases["v"]}, "leave-last-basket")
    assert [e.item_id for e in train["v"]] == ["a", "x"] and len(train["u"]) == 4
    train = training_events(by_user, tmp.cases, "temporal", cut)
    assert [e.item_id for e in train["u"]] == ["x", "a", "b"] and [e.item_id for e in train["v"]] == ["a", "x"]
    # cold targets: u's b and v's e occur in no other event (u's viewed-then-bought b stays warm in
    # the basket protocol: the view is history); v's basket keeps nothing (c, d nowhere else)
    assert warm_only(loo, by_user).cases == {} and list(warm_only(basket, by_user).cases) == ["u"]
    assert warm_only(basket, by_user).skipped["target never in the training events (cold item)"] == 1
    assert warm_only(tmp, by_user).cases == {}  # v's c is not bought before the cut-off


def test_random_candidates_follow_llmrank() -> None:
    case = HeldOut("u", (_ev("u", "h1", 1), _ev("u", "h2", 2)), ("t",))
    catalogue = sorted({"t", "h1", "h2", *(f"n{i}" for i in range(40))})
    got = random_candidates(case, catalogue, 20, seed=7)
    assert got is not None
    rc, relevant = got
    assert len(rc.candidates) == 20 and rc.candidates.count("t") == 1 and relevant == ["t"]
    assert not {"h1", "h2"} & set(rc.candidates)  # never a history item
    again = random_candidates(case, catalogue, 20, seed=7)
    assert again is not None and again[0].candidates == rc.candidates  # seeded per user
    assert random_candidates(case, catalogue, 20, seed=8) != got
    assert random_candidates(case, catalogue[:15], 20, seed=7) is None  # too few untouched items


def test_candidate_recall_and_repeat_targets_from_records() -> None:
    """3 cases: the generator retrieved 2 held-out items (66.67 %); one target repeats a history item."""
    recs = [{"ranking": ["t", "x"], "relevant": ["t"], "valid": True, "retrieved": True, "candidate_hit": True,
             "candidate_k": 20, "target_in_history": False},
            {"ranking": ["x", "t"], "relevant": ["t"], "valid": True, "retrieved": True, "candidate_hit": True,
             "candidate_k": 20, "target_in_history": True},
            {"ranking": ["x", "y"], "relevant": ["t"], "valid": True, "retrieved": True, "candidate_hit": False,
             "candidate_k": 20, "target_in_history": False}]
    for r in recs:
        r.update(responses=[], prompt_tokens=0, completion_tokens=0, latency_s=0.0, wall_s=0.0)
    m = compute_metrics(recs)
    assert m["candidate_recall@20"] == pytest.approx(66.6667, abs=1e-4)
    assert m["ndcg@10"] == pytest.approx(100 * (1 + 1 / math.log2(3)) / 3, abs=1e-4)
    assert m["target_in_history_rate"] == pytest.approx(33.3333, abs=1e-4)
    assert m["n_new_items"] == 2 and m["ndcg@10_new_items"] == 50.0
    lo, hi = m["ndcg@10_ci95"]
    assert lo <= m["ndcg@10"] <= hi


def _shop(ws: Path) -> None:
    """A toy shop over 60 days: 30 loyal users buy every 5 days; 30 lapsing users view items every
    5 days and buy only in their first 30 days. Dataset ``shop``."""
    events = []
    for u in range(60):
        loyal = u < 30
        for day in range(0, 60, 5):
            minutes = day * 1440 + u
            events.append(_ev(f"s{u}", f"i{(u + day) % 7}", minutes, "view"))
            if loyal or day < 30:
                events.append(_ev(f"s{u}", f"i{(u + day) % 7}", minutes + 30))
    store = EventStore(ws / "shoplens.sqlite3")
    store.add_items("shop", [CatalogItem(item_id=f"i{j}", title=f"Toy item {j}") for j in range(7)])
    store.add_events("shop", events)
    store.close()


def test_churn_and_intent_evals_take_any_stored_dataset(ws: Path) -> None:
    """`shoplens eval churn|intent --dataset NAME`: cut-offs from the data's last horizon, the
    baseline on every row (no model), the run under the workspace; an unknown dataset is refused
    with the datasets that exist."""
    from ui.cli import app

    _shop(ws)
    r = CliRunner().invoke(app, ["eval", "churn", "--dataset", "shop", "--horizon-days", "14", "--no-model",
                                 "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    run_dir = Path(r.output.strip().splitlines()[-1])
    assert run_dir.parent == ws / "runs"
    cfg = json.loads((run_dir / "config.json").read_text())
    # the data ends on day 55: test as of day ~41, training as of day ~27; the lapsing half's last
    # purchase is on day 25, so both label periods see them churn and the loyal half buy
    assert cfg["dataset"] == "shop" and cfg["horizon_days"] == 14
    assert cfg["n_test"] == 60 and cfg["test_churn_rate"] == 0.5 and cfg["train_churn_rate"] == 0.5
    r = CliRunner().invoke(app, ["eval", "intent", "--dataset", "shop", "--horizon-hours", "240", "--no-model",
                                 "--workspace", str(ws)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((Path(r.output.strip().splitlines()[-1]) / "config.json").read_text())
    assert cfg["dataset"] == "shop" and cfg["horizon_h"] == 240 and cfg["n_test"] > 0
    r = CliRunner().invoke(app, ["eval", "churn", "--dataset", "nope", "--no-model", "--workspace", str(ws)])
    assert r.exit_code == 2 and "--dataset nope: no such dataset" in r.output and "shop" in r.output


def test_the_cli_warns_when_fewer_users_ran_or_random_targets_are_mostly_repeats() -> None:
    from ui.eval_cli import _run_warnings

    assert _run_warnings({"n_cases": 50, "target_in_history_rate": 20.0}, 50, "random") == []
    fewer, repeats = _run_warnings({"n_cases": 17, "target_in_history_rate": 100.0}, 50, "random")
    assert fewer.startswith("17 of the 50 users asked for were evaluated")
    assert repeats.startswith("100% of the targets are items the user touched before")
    # retrieved candidates hold touched items too: no repeat warning there; --users 0 means all
    assert _run_warnings({"n_cases": 17, "target_in_history_rate": 100.0}, None, "retrieved") == []
