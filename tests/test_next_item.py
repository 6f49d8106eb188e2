"""NextItemService end to end on a tiny catalogue: FakeModel for the LLM, HashingEmbedder for
retrieval, a real EventStore and real artifacts in tmp_path."""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.data.artifacts import DatasetArtifacts, build_artifacts, load_artifacts
from agent.data.candidates import Candidate
from agent.data.store import EventStore
from agent.domain.history import build_history
from agent.domain.predictions import explanation_json_schema, explanation_schema_labels
from agent.domain.predictions.common import Verification
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import Completion, ModelUnavailableError, Usage
from agent.llm.fake import FakeCall, FakeModel, Reply
from agent.llm.verbalizer import LABELS
from agent.tasks.next_item import NextItemConfig, NextItemService, reason_facts
from retrieval.embedder import HashingEmbedder

DS = "shop"
CATALOG = {
    "m1": "White ceramic mug",
    "m2": "Blue ceramic mug",
    "t1": "Ceramic teapot",
    "t2": "Green tea tin",
    "c1": "Vanilla scented candle",
    "c2": "Rose scented candle",
    "l1": "Garden candle lantern",
    "g1": "Garden spade",
    "g2": "Garden gloves",
    "g3": "Watering can",
    "b1": "Cotton tote bag",
    "b2": "Jute shopping bag",
}
# user -> [(item, event type, day of December 2011)]
EVENTS = {
    "u1": [("m1", "view", 1), ("m1", "purchase", 1), ("t1", "view", 2), ("t1", "cart", 3),
           ("c1", "view", 4)],
    "u2": [("m1", "purchase", 1), ("t1", "purchase", 2), ("t2", "purchase", 3),
           ("c1", "purchase", 4)],
    "u3": [("g1", "purchase", 1), ("g2", "purchase", 2), ("g3", "purchase", 3),
           ("l1", "purchase", 4)],
    "u4": [("c1", "purchase", 1), ("c2", "purchase", 2), ("l1", "purchase", 3),
           ("m2", "purchase", 4)],
    "u5": [("b1", "purchase", 1), ("b2", "purchase", 2), ("m1", "purchase", 3),
           ("m2", "purchase", 4)],
}
N_U1_EVENTS = len(EVENTS["u1"])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore(tmp_path / "events.sqlite")
    s.add_items(DS, [CatalogItem(item_id=i, title=t) for i, t in CATALOG.items()])
    s.add_events(DS, [
        BehaviorEvent(user_id=u, item_id=i, event_type=kind,
                      timestamp=f"2011-12-{day:02d}T{10 + n:02d}:00:00Z",
                      basket_id=f"{u}-{day}" if kind == "purchase" else None)
        for u, rows in EVENTS.items() for n, (i, kind, day) in enumerate(rows)
    ])
    yield s
    s.close()


@pytest.fixture
def artifacts(store: EventStore, tmp_path: Path) -> DatasetArtifacts:
    """A dataset whose fitted model weight is 0.5 (as `shoplens train --llm` would set it when the
    model showed a gain): these tests are about how the model's ranking is used."""
    arts = build_artifacts(store, DS, HashingEmbedder(64), tmp_path / "indexes" / DS, show_progress=False)
    arts.llm_weight, arts.llm_weight_note = 0.5, "model ranking weight 0.5 (test fixture)"
    return arts


@pytest.fixture
def u1_events(store: EventStore) -> list[BehaviorEvent]:
    return store.user_events(DS, "u1")


def label_reply(call: FakeCall) -> Completion:
    """A verbalizer answer that prefers earlier labels: A 0.5, B 0.25, C 0.125, ..."""
    n = len(re.findall(r"^[A-Z]\. ", call.messages[1]["content"], flags=re.M))
    top = {LABELS[i]: math.log(0.5 ** (i + 1)) for i in range(n)}
    return Completion(text="A", usage=Usage(120, 1), latency_s=0.01, top_logprobs=[top])


def explanation(labels: list[str], whys: dict[str, str] | None = None, summary: str | None = None,
                ) -> str:
    """The model's explanation JSON: a "why" per label (default "fits a cosy evening, reason X"),
    and the intent summary."""
    whys = whys or {}
    return json.dumps({
        "reasons": [{"item": lab, "why": whys.get(lab, f"fits a cosy evening, reason {lab}")} for lab in labels],
        "intent_summary": summary or "Setting up a cosy tea corner with candles.",
    })


def scripted_model(explanations: list[Reply], verbalizer=label_reply) -> FakeModel:
    """Verbalizer calls (no schema) get `verbalizer`; explanation calls pop `explanations`."""
    queue = deque(explanations)

    def respond(call: FakeCall) -> Reply:
        if call.schema is None:
            return verbalizer(call)
        if not queue:
            return ModelUnavailableError("test: no explanation reply left")
        return queue.popleft()

    return FakeModel(responder=respond)


def candidate_ids(artifacts: DatasetArtifacts, events: list[BehaviorEvent], *, n: int = 20,
                  exclude: set[str] | None = None) -> list[str]:
    purchased = {e.item_id for e in events if e.event_type == "purchase"}
    cands = artifacts.generator().generate([e.item_id for e in events], n=n, user_id="u1",
                                           exclude=purchased if exclude is None else exclude)
    return [c.item_id for c in cands]


def explain_calls(model: FakeModel) -> list[FakeCall]:
    return [c for c in model.calls if c.schema is not None]


async def test_happy_path(artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]) -> None:
    model = scripted_model([explanation(["A", "B", "C", "D", "E"])])
    svc = NextItemService(model, model_sha256="abc123")
    pred = await svc.predict("u1", u1_events, artifacts, NextItemConfig(k=5))

    ids = [i.item_id for i in pred.items]
    assert len(ids) == 5 == len(set(ids))
    assert set(ids) <= set(candidate_ids(artifacts, u1_events))
    assert "m1" not in ids  # bought already
    assert [i.rank for i in pred.items] == [1, 2, 3, 4, 5]
    assert [i.score for i in pred.items] == sorted((i.score for i in pred.items), reverse=True)
    assert all(i.reason_source == "model" for i in pred.items)
    # facts from the retrieval sources (with the cited event), then the model's "why" as a sentence
    for lab, item in zip("ABCDE", pred.items, strict=True):
        fact, refs = reason_facts(Candidate(item.item_id, {k: v for k, v in item.source_scores.items() if k != "llm"}),
                                  build_history("u1", u1_events, artifacts.catalog, window=20), artifacts)
        assert item.reason == f"{fact} Fits a cosy evening, reason {lab}."
        assert [e.ref for e in item.evidence] == refs
    assert pred.summary_source == "model"
    assert pred.intent_summary == "Setting up a cosy tea corner with candles."
    assert not pred.cold_start and pred.dataset == DS and pred.k == 5

    user_event_ids = {e.event_id: e for e in u1_events}
    for item in pred.items:  # a best-seller with no related event cites none (never an unrelated one)
        for ev in item.evidence:
            assert ev.event_id in user_event_ids
            assert user_event_ids[ev.event_id].item_id == ev.item_id
        assert "llm" in item.source_scores
    # t1 (viewed E3, carted E4) cites its own latest event, the cart
    t1 = next(i for i in pred.items if i.item_id == "t1")
    assert [(e.ref, e.item_id, e.event_type) for e in t1.evidence] == [("E4", "t1", "cart")]
    assert t1.reason.startswith("Recently added to cart by this customer (E4).")

    meta = pred.meta
    assert meta.attempts == 3 == len(model.calls)  # 2 verbalizer passes + 1 explanation
    assert meta.prompt_versions == ["next_item_rank.v1", "next_item_explain.v3"]
    assert meta.model_id == "fake-model" and meta.model_sha256 == "abc123"
    assert meta.prompt_tokens == 2 * 120 + 10 and meta.completion_tokens == 2 * 1 + 5
    assert not meta.degraded and meta.degraded_reason is None
    assert meta.model_latency_s == pytest.approx(0.02)
    assert meta.verification == Verification(checked=6, verified=6, repaired=0, replaced=0)
    # the explanation call is schema-constrained to the 5 labels, one slot each in rank order
    (call,) = explain_calls(model)
    assert explanation_schema_labels(call.schema) == ["A", "B", "C", "D", "E"]
    assert call.top_logprobs == 0


async def test_model_preference_moves_an_item_to_the_top(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    def loves_gloves(call: FakeCall) -> Completion:
        m = re.search(r"^([A-Z])\. Garden gloves$", call.messages[1]["content"], flags=re.M)
        assert m, "g2 should be a candidate"
        top = {m.group(1): math.log(0.97), "A" if m.group(1) != "A" else "B": math.log(0.01)}
        return Completion(text=m.group(1), top_logprobs=[top])

    cands = candidate_ids(artifacts, u1_events)
    assert "g2" in cands and cands[0] != "g2"
    model = scripted_model([], verbalizer=loves_gloves)
    pred = await NextItemService(model).predict(
        "u1", u1_events, artifacts, NextItemConfig(k=3, explain=False))
    assert pred.items[0].item_id == "g2"
    assert pred.items[0].source_scores["llm"] == pytest.approx(0.97 / 0.98, abs=1e-5)
    assert explain_calls(model) == []
    assert pred.meta.prompt_versions == ["next_item_rank.v1"]


def yes_to_gloves(call: FakeCall) -> Completion:
    """A pointwise answer: P(yes) 0.97 for the garden gloves, 0.02 for anything else."""
    asked = call.messages[1]["content"].split("Candidate product: ")[1].split("\n")[0]
    p = 0.97 if asked == "Garden gloves" else 0.02
    return Completion(text="Yes" if p > 0.5 else "No", usage=Usage(200, 1, cached_tokens=150),
                      top_logprobs=[{"Yes": math.log(p), "No": math.log(1 - p)}])


async def test_pointwise_scorer_asks_each_candidate_once_and_moves_a_yes_to_the_top(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    cands = candidate_ids(artifacts, u1_events)
    assert "g2" in cands and cands[0] != "g2"
    model = scripted_model([], verbalizer=yes_to_gloves)
    pred = await NextItemService(model).predict(
        "u1", u1_events, artifacts, NextItemConfig(k=3, explain=False, llm_scorer="pointwise"))
    assert pred.items[0].item_id == "g2"
    assert pred.items[0].source_scores["llm"] == pytest.approx(0.97, abs=1e-6)  # P(yes) of the yes/no pair
    assert len(model.calls) == len(cands)  # one call per candidate, no permutations
    assert all(c.max_tokens == 1 and c.top_logprobs == 20 for c in model.calls)
    assert pred.meta.prompt_versions == ["next_item_pointwise.v1"]
    assert pred.meta.attempts == len(cands) and pred.meta.prompt_tokens == 200 * len(cands)
    # every candidate's prompt starts with the same history: the server's prefix cache reuses it
    heads = {c.messages[1]["content"].split("Candidate product:")[0] for c in model.calls}
    assert len(heads) == 1


async def test_a_callers_candidates_beyond_n_candidates_are_ranked_after_the_model_scored_head(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    mine = ["g2", "t2", "c2", "l1", "g1", "g3", "b1", "b2"]
    model = scripted_model([], verbalizer=yes_to_gloves)
    cfg = NextItemConfig(k=len(mine), n_candidates=3, explain=False, llm_scorer="pointwise")
    pred = await NextItemService(model).predict("u1", u1_events, artifacts, cfg, candidates=mine)
    got = [i.item_id for i in pred.items]
    assert sorted(got) == sorted(mine)  # every candidate the caller sent, none dropped, none added
    assert len(model.calls) == 3  # the model scored only the fusion's best 3
    asked = {c.messages[1]["content"].split("Candidate product: ")[1].split("\n")[0] for c in model.calls}
    head = {i.item_id for i in pred.items[:3]}
    assert {CATALOG[i] for i in head} == asked  # the scored head stays on top ...
    assert [i.score for i in pred.items] == sorted((i.score for i in pred.items), reverse=True)
    assert all("llm" not in i.source_scores or i.item_id in head for i in pred.items)  # ... the tail unscored


@pytest.mark.parametrize(
    ("bad", "error_text"),
    [
        (explanation(["A", "B", "Z"]),
         "items ['Z'] are not recommended products; use only ['A', 'B', 'C']"),
        (explanation(["A", "B"]), "give exactly one reason for each of ['A', 'B', 'C']; missing ['C']"),
        ('{"reasons": [', "answer: Invalid JSON"),
    ],
)
async def test_invalid_explanation_is_repaired_once(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent], bad: str, error_text: str
) -> None:
    good = explanation(["A", "B", "C"])
    model = scripted_model([bad, good])
    pred = await NextItemService(model).predict("u1", u1_events, artifacts, NextItemConfig(k=3))

    assert pred.meta.attempts == 2 + 2  # verbalizer passes + explanation + repair
    assert all(i.reason_source == "model" for i in pred.items)
    assert not pred.meta.degraded
    first, repair = explain_calls(model)
    assert repair.messages[: len(first.messages)] == first.messages
    assert repair.messages[-2] == {"role": "assistant", "content": bad}
    assert repair.messages[-1]["role"] == "user"
    assert error_text in repair.messages[-1]["content"]
    assert repair.messages[-1]["content"].startswith("Your JSON answer was invalid:")
    assert repair.schema == first.schema


async def test_invalid_twice_falls_back_with_labels(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    bad = explanation(["A", "B", "Z"])
    model = scripted_model([bad, bad])
    pred = await NextItemService(model).predict("u1", u1_events, artifacts, NextItemConfig(k=3))

    assert len(pred.items) == 3
    for item in pred.items:
        assert item.reason_source == "fallback"
        assert item.reason.startswith("[retrieval fallback] ")
        assert all(ev.event_id in {e.event_id for e in u1_events} for ev in item.evidence)
    assert pred.summary_source == "fallback"
    assert pred.intent_summary.startswith("[retrieval fallback] 5 events")
    assert pred.meta.degraded
    assert pred.meta.degraded_reason.startswith("explanation invalid after 2 attempts")
    assert "['Z'] are not recommended products" in pred.meta.degraded_reason
    assert pred.meta.attempts == 4
    assert len(explain_calls(model)) == 2  # exactly one repair, no more


async def test_model_unavailable_degrades_to_retrieval(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    model = FakeModel.with_replies([ModelUnavailableError("connection refused")])
    pred = await NextItemService(model).predict("u1", u1_events, artifacts, NextItemConfig(k=4))

    assert [i.item_id for i in pred.items] == candidate_ids(artifacts, u1_events)[:4]
    assert all(i.reason_source == "fallback" and "llm" not in i.source_scores for i in pred.items)
    assert pred.meta.degraded
    assert "model unavailable for ranking (connection refused)" in pred.meta.degraded_reason
    assert "model unavailable for explanations" in pred.meta.degraded_reason
    assert pred.meta.attempts == 0
    assert len(model.calls) == 2  # one verbalizer pass, one explanation try


async def test_no_model_is_retrieval_only(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    pred = await NextItemService(None).predict("u1", u1_events, artifacts, NextItemConfig(k=5))

    assert [i.item_id for i in pred.items] == candidate_ids(artifacts, u1_events)[:5]
    assert all(i.reason.startswith("[retrieval fallback] ") for i in pred.items)
    assert pred.meta.degraded
    assert pred.meta.degraded_reason == "no model configured: ranked by retrieval fusion only"
    assert pred.meta.prompt_versions == [] and pred.meta.attempts == 0
    assert pred.meta.model_id is None
    assert pred.items[0].score == 1.0  # the best fused candidate scales to 1


async def test_cold_start_uses_popularity_without_calling_the_model(
    artifacts: DatasetArtifacts,
) -> None:
    model = FakeModel()
    pred = await NextItemService(model).predict("newcomer", [], artifacts, NextItemConfig(k=4))

    assert model.calls == []
    assert pred.cold_start
    # c1 and m1 occur in 3 users' sequences, l1, m2 and t1 in 2: ties broken by id
    assert [i.item_id for i in pred.items] == artifacts.popularity.top(4) == ["c1", "m1", "l1", "m2"]
    assert all(set(i.source_scores) == {"popularity"} for i in pred.items)
    assert all("cold start" in i.reason and i.evidence == [] for i in pred.items)
    assert pred.summary_source == "fallback" and "cold start" in pred.intent_summary
    assert "cold start: no history, popularity ranking" in pred.meta.notes
    assert not pred.meta.degraded and pred.meta.attempts == 0


async def test_purchased_items_excluded_unless_repurchase(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    svc = NextItemService(None)
    cfg = NextItemConfig(k=11)
    plain = await svc.predict("u1", u1_events, artifacts, cfg)
    assert "m1" not in {i.item_id for i in plain.items}
    # viewed and carted items are not excluded, only bought ones
    assert {"t1", "c1"} <= {i.item_id for i in plain.items}
    again = await svc.predict("u1", u1_events, artifacts, NextItemConfig(k=11, repurchase=True))
    assert "m1" in {i.item_id for i in again.items}


async def test_fewer_candidates_than_k_is_noted(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    n = len(candidate_ids(artifacts, u1_events, n=100))
    assert n == len(CATALOG) - 1  # every item but the bought m1
    pred = await NextItemService(None).predict("u1", u1_events, artifacts, NextItemConfig(k=50))
    assert len(pred.items) == n
    assert f"only {n} candidates exist for k=50" in pred.meta.notes


async def test_window_limits_refs(artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]) -> None:
    model = scripted_model([explanation(["A", "B"])])
    pred = await NextItemService(model).predict(
        "u1", u1_events, artifacts, NextItemConfig(k=2, window=2))
    (call,) = explain_calls(model)
    assert "E1 · " in call.messages[1]["content"] and "E3 · " not in call.messages[1]["content"]
    # E1 is the oldest *shown* event: the cart of t1 (4th of 5 events)
    assert (pred.items[0].evidence[0].item_id, pred.items[0].evidence[0].event_type) == ("t1", "cart")


def test_saved_artifacts_load_back(store: EventStore, artifacts: DatasetArtifacts,
                                   tmp_path: Path, u1_events: list[BehaviorEvent]) -> None:
    back = load_artifacts(store, DS, "hashing-64", 64, tmp_path / "indexes" / DS)
    assert back.user_items == artifacts.user_items
    assert back.user_items["u1"] == ["m1", "t1", "c1"]  # consecutive repeats collapsed
    assert candidate_ids(back, u1_events) == candidate_ids(artifacts, u1_events)


async def test_more_candidates_than_labels(tmp_path: Path) -> None:
    """Only 26 candidates can carry a letter; the rest are still ranked, without an llm score."""
    s = EventStore(tmp_path / "big.sqlite")
    s.add_items(DS, [CatalogItem(item_id=f"x{n:02d}", title=f"ceramic mug model {n}")
                     for n in range(40)])
    s.add_events(DS, [
        BehaviorEvent(user_id=f"v{n % 8}", item_id=f"x{n:02d}", event_type="purchase",
                      timestamp=f"2011-12-{1 + n % 20:02d}T10:{n:02d}:00Z")
        for n in range(40)
    ])
    arts = build_artifacts(s, DS, HashingEmbedder(64), tmp_path / "big", show_progress=False)
    events = s.user_events(DS, "v0")
    model = scripted_model([], verbalizer=label_reply)
    pred = await NextItemService(model).predict(
        "v0", events, arts, NextItemConfig(k=30, n_candidates=35, explain=False))
    s.close()
    assert len(pred.items) == 30
    assert sum("llm" in i.source_scores for i in pred.items) <= 26
    assert all(len(re.findall(r"^[A-Z]\. ", c.messages[1]["content"], flags=re.M)) == 26
               for c in model.calls)


def test_items_with_mostly_negative_recent_reviews_are_down_ranked() -> None:
    """Sentiment feeds recommendation: a penalised item loses its place and its reason says why."""
    from agent.data.candidates import Candidate
    from agent.tasks.next_item import blend, review_note

    a, b = Candidate("A", fused=1.0), Candidate("B", fused=0.8)
    penalties = {"A": {"n": 6, "negative": 5, "share_negative": 0.625, "penalty": 0.25}}
    assert [c.item_id for c, _ in blend([a, b], {}, 0.5)] == ["A", "B"]
    ranked = blend([a, b], {}, 0.5, penalties)
    assert [(c.item_id, s) for c, s in ranked] == [("B", 0.8), ("A", 0.75)]
    assert review_note("A", penalties) == " Down-ranked: 5 of 6 recent reviews are negative."
    assert review_note("B", penalties) == ""


async def test_duplicate_candidate_ids_are_ranked_once_and_the_shortfall_is_noted(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    pred = await NextItemService(None).predict("u1", u1_events, artifacts, NextItemConfig(k=3, explain=False),
                                               candidates=["g2", "g2", "t2"])
    assert sorted(i.item_id for i in pred.items) == ["g2", "t2"]
    assert len(pred.items) == 2 and "only 2 candidates exist for k=3" in pred.meta.notes


def test_explanation_grammar_fixes_one_slot_per_product_in_order() -> None:
    """llama.cpp's JSON-schema grammar (the embedded server's) gets one tuple slot per label:
    a missing or repeated product cannot be generated (it used to cost a repair call)."""
    gbnf = pytest.importorskip("llama_cpp.llama_grammar", reason="llama-cpp-python not installed: make setup")
    schema = explanation_json_schema(["A", "B"])
    grammar = gbnf.json_schema_to_gbnf(json.dumps(schema))
    assert 'reasons ::= "[" space reasons-tuple-0 "," space reasons-tuple-1 "]" space' in grammar
    assert 'reasons-tuple-1-item ::= "\\"B\\""' in grammar
    assert explanation_schema_labels(schema) == ["A", "B"]


def test_recent_source_sums_decayed_events_per_item() -> None:
    from agent.data.candidates import recent_scores

    # u1's items oldest first; ages from the newest: c1 0, t1 1 and 2, m1 3 and 4 (decay 0.95)
    got = recent_scores(["m1", "m1", "t1", "t1", "c1"])
    assert got == pytest.approx({"c1": 1.0, "t1": 0.95 + 0.9025, "m1": 0.857375 + 0.81450625})
    assert recent_scores(["a", "b", "c"], window=2) == pytest.approx({"b": 0.95, "c": 1.0})
    assert recent_scores([]) == {}


async def test_recently_touched_items_come_back_with_a_reason_that_cites_their_own_event(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    from agent.data.candidates import Candidate
    from agent.domain.history import build_history
    from agent.tasks.next_item import fallback_reason

    # ranked by the recent source alone: t1 (viewed, carted) 1.8525, c1 (viewed) 1.0, scaled by
    # t1's; m1 was bought, so it is excluded like every purchase
    pred = await NextItemService(None).predict("u1", u1_events, artifacts,
                                               NextItemConfig(k=3, source_weights={"recent": 1.0}))
    assert [i.item_id for i in pred.items[:2]] == ["t1", "c1"]
    assert pred.items[0].source_scores["recent"] == 1.0
    assert pred.items[1].source_scores["recent"] == round(1.0 / 1.8525, 6)
    assert "m1" not in {i.item_id for i in pred.items}
    # the template reason names the candidate's own latest event (t1's cart is E4), not a neighbour
    hist = build_history("u1", u1_events, artifacts.catalog)
    text, refs = fallback_reason(Candidate("t1", {"recent": 1.0, "covisit": 0.2}), hist, artifacts, cold=False)
    assert (text, refs) == ("[retrieval fallback] Recently added to cart by this customer (E4).", ["E4"])
    text, refs = fallback_reason(Candidate("c1", {"recent": 1.0}), hist, artifacts, cold=False)
    assert (text, refs) == ("[retrieval fallback] Recently viewed by this customer (E5).", ["E5"])
    # the user's own event explains the item even when another source scores it higher (an item
    # is always its own nearest embedding neighbour)
    text, refs = fallback_reason(Candidate("c1", {"embedding": 1.0, "recent": 0.3}), hist, artifacts, cold=False)
    assert (text, refs) == ("[retrieval fallback] Recently viewed by this customer (E5).", ["E5"])
    # an item the user never touched is explained by a neighbour, never by itself
    text, refs = fallback_reason(Candidate("c2", {"embedding": 1.0}), hist, artifacts, cold=False)
    assert not text.startswith("[retrieval fallback] Recently") and refs != []


async def test_a_reviewed_item_counts_as_owned_and_is_excluded_like_a_purchase(
    store: EventStore, artifacts: DatasetArtifacts
) -> None:
    # review-only data (the Amazon review sets): the reviewer has the item
    events = [BehaviorEvent(user_id="u6", item_id="g1", event_type="view", timestamp="2011-12-05T10:00:00Z"),
              BehaviorEvent(user_id="u6", item_id="g2", event_type="review", timestamp="2011-12-05T11:00:00Z",
                            rating=5, review_text="Sturdy gloves")]
    svc = NextItemService(None)
    plain = await svc.predict("u6", events, artifacts, NextItemConfig(k=11))
    assert "g2" not in {i.item_id for i in plain.items}
    assert "g1" in {i.item_id for i in plain.items}  # only viewed: still a candidate
    again = await svc.predict("u6", events, artifacts, NextItemConfig(k=11, repurchase=True))
    assert "g2" in {i.item_id for i in again.items}


async def test_an_untrained_dataset_is_not_ranked_by_the_model_which_still_explains(
    tmp_path: Path, artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    from dataclasses import replace

    from agent.app.runtime import Runtime
    from agent.app.service import ShopLensService
    from agent.settings import Settings

    # the served configuration leaves the weight to the dataset unless a setting fixes it
    assert ShopLensService(Runtime(Settings(workspace=tmp_path / "b")), use_model=False
                           ).next_item_config(k=5).llm_weight is None
    assert ShopLensService(Runtime(Settings(workspace=tmp_path / "a", llm_weight=0.3)),
                           use_model=False).next_item_config(k=5).llm_weight == 0.3
    untrained = replace(artifacts, llm_weight=0.0, llm_weight_note="")
    model = scripted_model([explanation(["A", "B", "C", "D", "E"])])
    pred = await NextItemService(model).predict("u1", u1_events, untrained, NextItemConfig(k=5))
    # no verbalizer call at all: the order is retrieval's, the reasons are the model's
    assert [c.schema is None for c in model.calls] == [False]
    assert [i.item_id for i in pred.items] == candidate_ids(artifacts, u1_events)[:5]
    assert not any("llm" in i.source_scores for i in pred.items)
    assert all(i.reason_source == "model" for i in pred.items)
    assert pred.meta.prompt_versions == ["next_item_explain.v3"]
    assert ("model ranking off (weight 0): no model weight was fitted for 'shop'; `shoplens train --dataset "
            "shop --llm` measures one on validation users") in pred.meta.notes
    # the same at weight 0 set by configuration, said as such
    model = scripted_model([], verbalizer=label_reply)
    pred = await NextItemService(model).predict("u1", u1_events, artifacts,
                                                NextItemConfig(k=5, explain=False, llm_weight=0.0))
    assert model.calls == [] and "model ranking off: weight 0 set by configuration" in pred.meta.notes
    # and a fitted weight ranks: the dataset's note is carried
    model = scripted_model([], verbalizer=label_reply)
    pred = await NextItemService(model).predict("u1", u1_events, artifacts, NextItemConfig(k=5, explain=False))
    assert len(model.calls) == 2 and "model ranking weight 0.5 (test fixture)" in pred.meta.notes


async def test_an_item_the_catalogue_lacks_is_never_recommended(artifacts: DatasetArtifacts) -> None:
    # POST /v1/events takes any item id; the user's last event names one the catalogue lacks
    events = [BehaviorEvent(user_id="u7", item_id="t1", event_type="view", timestamp="2011-12-05T10:00:00Z"),
              BehaviorEvent(user_id="u7", item_id="NOT-IN-CATALOG", event_type="view",
                            timestamp="2011-12-05T11:00:00Z")]
    pred = await NextItemService(None).predict("u7", events, artifacts, NextItemConfig(k=5))
    assert "NOT-IN-CATALOG" not in {i.item_id for i in pred.items}
    assert "t1" in {i.item_id for i in pred.items}  # the catalogue item the user viewed comes back
    assert "1 item(s) of this history are not in the catalogue and are never recommended" in pred.meta.notes


def test_template_reasons_say_bought_only_where_the_anchor_was_bought(artifacts: DatasetArtifacts) -> None:
    from agent.data.candidates import Candidate
    from agent.domain.history import build_history
    from agent.tasks.next_item import fallback_reason

    def reason(event_type: str, source: str) -> str:
        events = [BehaviorEvent(user_id="u8", item_id="t1", event_type=event_type, timestamp="2011-12-05T10:00:00Z")]
        hist = build_history("u8", events, artifacts.catalog)
        cand = Candidate(item_id="c1", source_scores={source: 1.0, "popularity": 0.1})
        return fallback_reason(cand, hist, artifacts, cold=False)[0]

    assert reason("purchase", "covisit") == ("[retrieval fallback] Customers who bought Ceramic teapot (E1) often "
                                             "bought this too.")
    assert reason("view", "covisit") == ("[retrieval fallback] Customers who viewed Ceramic teapot (E1) often "
                                         "chose this too.")
    assert "bought" not in reason("view", "similar_users").lower()


async def test_a_wrong_why_gets_one_repair_with_its_violations_fed_back(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    bad = explanation(["A", "B", "C"], {"B": "bought 7 of them with E9"})
    model = scripted_model([bad, explanation(["A", "B", "C"])])
    pred = await NextItemService(model).predict("u1", u1_events, artifacts, NextItemConfig(k=3))
    first, repair = explain_calls(model)
    assert repair.messages[: len(first.messages)] == first.messages
    assert repair.messages[-2] == {"role": "assistant", "content": bad}
    b_refs = [e.ref for e in pred.items[1].evidence]
    assert repair.messages[-1]["content"] == (
        "Some sentences of your answer are not supported by the data:\n"
        f"- B: cites E9, which is not among its evidence {b_refs or '(none)'}\n"
        "- B: states 7, which is not in the data; use only numbers shown\n"
        "Reply again with the whole JSON answer, those sentences corrected and the others unchanged.")
    assert all(i.reason_source == "model" for i in pred.items)
    assert pred.items[1].reason.endswith(" Fits a cosy evening, reason B.")
    assert pred.meta.verification is not None
    assert pred.meta.verification.model_dump(exclude={"violations"}) == dict(checked=4, verified=3, repaired=1, replaced=0)


async def test_a_sentence_wrong_after_its_repair_is_replaced_by_the_labelled_template(
    artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]
) -> None:
    plain = await NextItemService(None).predict("u1", u1_events, artifacts, NextItemConfig(k=3, llm_weight=0.0))
    third = plain.items[2].title  # the summary ranks the 3rd item first: wrong both times
    bad = explanation(["A", "B", "C"], {"B": "bought 7 of them with E9"}, summary=f"Most likely to buy the {third}.")
    model = scripted_model([bad, bad])
    pred = await NextItemService(model).predict("u1", u1_events, artifacts, NextItemConfig(k=3, llm_weight=0.0))
    assert len(explain_calls(model)) == 2  # one repair, no more
    assert [i.reason_source for i in pred.items] == ["model", "fallback", "model"]
    assert pred.items[1].reason.startswith("[retrieval fallback] ") and "E9" not in pred.items[1].reason
    assert pred.summary_source == "fallback" and pred.intent_summary.startswith("[retrieval fallback] ")
    v = pred.meta.verification
    assert v is not None and (v.checked, v.verified, v.repaired, v.replaced) == (4, 2, 0, 2)
    top = pred.items[0].title
    assert (f"repair: summary: says 'Most likely' but does not name the top-ranked item '{top}' first"
            in v.violations)
    assert not pred.meta.degraded  # the answer is whole: two sentences are templates, said in verification
