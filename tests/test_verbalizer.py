"""Verbalizer: label distribution from top log-probabilities, permutations, position bias."""

from __future__ import annotations

import math

import pytest

from agent.llm.base import Completion, Usage
from agent.llm.fake import FakeCall, FakeModel
from agent.llm.prompting import load_prompt
from agent.llm.verbalizer import (
    FLOOR_LOGPROB,
    LABELS,
    label_distribution,
    permutations_for,
    verbalizer_scores,
)

HISTORY_VARS = {
    "user": {"user_id": "u1", "n_events": 2, "n_baskets": 1, "span": "from 2011-12-01 to 2011-12-02 (1 days)",
             "top_themes": ["mug"], "as_of_label": "the last event"},
    "events": [{"ref": "E1", "when": "1 day before", "text": "bought White mug"},
               {"ref": "E2", "when": "same day", "text": "viewed Tea set"}],
}


def test_label_distribution_hand_computed() -> None:
    top = {"A": math.log(0.5), " B": math.log(0.25), "C": math.log(0.125), "The": math.log(0.1)}
    probs, mass = label_distribution(top, ["A", "B", "C"])
    # renormalised over the labels only: 0.5, 0.25, 0.125 of a 0.875 mass ("The" ignored)
    assert mass == pytest.approx(0.875)
    assert probs == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert sum(probs) == pytest.approx(1.0)


def test_missing_label_gets_the_floor() -> None:
    top = {"A": math.log(0.5), " B": math.log(0.25), "C": math.log(0.125), "The": math.log(0.1)}
    probs, mass = label_distribution(top, ["A", "B", "C", "D"])
    floor = math.exp(FLOOR_LOGPROB)
    z = 0.875 + floor
    assert probs == pytest.approx([0.5 / z, 0.25 / z, 0.125 / z, floor / z], rel=1e-9, abs=0)
    assert 0 < probs[3] < 1e-12
    assert mass == pytest.approx(0.875)  # the floor adds no mass


def test_best_of_spaced_and_bare_token_wins() -> None:
    top = {" A": math.log(0.2), "A": math.log(0.6), "B": math.log(0.2)}
    probs, mass = label_distribution(top, ["A", "B"])
    assert probs == pytest.approx([0.75, 0.25])
    assert mass == pytest.approx(0.8)


def test_no_label_at_all_is_uniform_with_zero_mass() -> None:
    probs, mass = label_distribution({"The": -0.1, "I": -2.0}, ["A", "B", "C", "D"])
    assert probs == pytest.approx([0.25] * 4)
    assert mass == 0.0


def test_permutations_original_reverse_then_seeded_shuffles() -> None:
    ids = [f"i{n}" for n in range(8)]
    orders = permutations_for(ids, 4, seed=3)
    assert len(orders) == 4
    assert orders[0] == ids
    assert orders[1] == ids[::-1]
    for o in orders[2:]:
        assert sorted(o) == sorted(ids)
    assert orders[2] != orders[3]
    assert permutations_for(ids, 4, seed=3) == orders  # deterministic
    assert permutations_for(ids, 4, seed=4)[2:] != orders[2:]  # the seed matters
    assert permutations_for(ids, 1, seed=3) == [ids]
    assert permutations_for(ids, 2, seed=3) == [ids, ids[::-1]]
    assert ids == [f"i{n}" for n in range(8)]  # input not mutated


def _first_position_lover(call: FakeCall) -> Completion:
    """Always puts 0.6 on A, 0.25 on B, then 0.1, 0.04, ... whatever the candidates are."""
    probs = [0.6, 0.25, 0.1, 0.04, 0.01]
    top = {LABELS[i]: math.log(p) for i, p in enumerate(probs)}
    top[" the"] = math.log(0.001)
    return Completion(text="A", usage=Usage(100, 1), latency_s=0.25, top_logprobs=[top])


async def test_reverse_permutation_cancels_first_position_bias() -> None:
    model = FakeModel(responder=_first_position_lover)
    tpl = load_prompt("next_item_rank.v1")
    cands = ["x", "y", "z", "w"]
    titles = {"x": "White mug", "y": "Tea set", "z": "Candle", "w": "Spade"}
    res = await verbalizer_scores(model, tpl, HISTORY_VARS, cands, titles, permutations=2)
    # forward x,y,z,w gets A..D; reverse w,z,y,x gets A..D: first and last end equal
    assert res.scores["x"] == res.scores["w"]
    assert res.scores["y"] == res.scores["z"]
    z = 0.6 + 0.25 + 0.1 + 0.04
    assert res.scores["x"] == pytest.approx((0.6 + 0.04) / z / 2)
    assert res.scores["y"] == pytest.approx((0.25 + 0.1) / z / 2)
    assert sum(res.scores.values()) == pytest.approx(1.0)
    assert res.label_mass == pytest.approx(z)
    assert res.calls == 2 and len(model.calls) == 2
    assert res.orders == [cands, cands[::-1]]
    assert res.usage == Usage(200, 2)
    assert res.model_latency_s == pytest.approx(0.5)
    for call in model.calls:
        assert call.max_tokens == 1
        assert call.top_logprobs > 0
        assert call.schema is None
    # the prompt lists the candidates in each pass's order, labelled A..D
    assert "A. White mug\nB. Tea set\nC. Candle\nD. Spade" in model.calls[0].messages[1]["content"]
    assert "A. Spade\nB. Candle\nC. Tea set\nD. White mug" in model.calls[1].messages[1]["content"]
    assert "most likely buy next" in model.calls[0].messages[1]["content"]


async def test_one_permutation_keeps_the_bias() -> None:
    model = FakeModel(responder=_first_position_lover)
    tpl = load_prompt("next_item_rank.v1")
    res = await verbalizer_scores(model, tpl, HISTORY_VARS, ["x", "y"], {}, permutations=1)
    assert res.scores == pytest.approx({"x": 0.6 / 0.85, "y": 0.25 / 0.85})
    assert len(model.calls) == 1
    assert "A. item x" in model.calls[0].messages[1]["content"]  # unknown title shown by id


async def test_text_only_answer_counts_as_certain() -> None:
    model = FakeModel.with_replies([Completion(text="B")])
    tpl = load_prompt("next_item_rank.v1")
    res = await verbalizer_scores(model, tpl, HISTORY_VARS, ["x", "y", "z"], {}, permutations=1)
    assert res.scores["y"] == pytest.approx(1.0)
    assert res.scores["x"] == pytest.approx(0.0, abs=1e-12)


async def test_no_candidates_no_call_and_too_many_rejected() -> None:
    model = FakeModel()
    tpl = load_prompt("next_item_rank.v1")
    res = await verbalizer_scores(model, tpl, HISTORY_VARS, [], {})
    assert res.scores == {} and model.calls == []
    with pytest.raises(ValueError, match="at most 26"):
        await verbalizer_scores(model, tpl, HISTORY_VARS, [f"i{n}" for n in range(27)], {})
    assert model.calls == []
