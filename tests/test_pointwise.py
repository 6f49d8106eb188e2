"""Pointwise yes/no scoring (agent/llm/pointwise.py) with a fake model: margins, position
freedom, the shared prompt prefix, and what a missing yes/no does."""

from __future__ import annotations

import math

import pytest

from agent.llm.base import Completion, Usage
from agent.llm.fake import FakeCall, FakeModel
from agent.llm.pointwise import FLOOR_LOGPROB, pointwise_scores, sigmoid, yes_no_margin
from agent.llm.prompting import load_prompt

TITLES = {"tea": "Jasmine green tea", "pot": "Glass teapot", "oil": "Car engine oil 5W-30"}
VARS = {"history": ["Loose leaf green tea", "Porcelain tea cups"], "n_history": 2, "verb": "buy"}
P_YES = {"Jasmine green tea": 0.9, "Glass teapot": 0.6, "Car engine oil 5W-30": 0.05}


def _judge(call: FakeCall) -> Completion:
    """Answers from the candidate named in the prompt's last lines, whatever else it shows."""
    text = call.messages[-1]["content"]
    title = text.split("Candidate product: ")[1].split("\n")[0]
    p = P_YES[title]
    top = {"Yes": math.log(p), "No": math.log(1 - p), "I": math.log(0.001)}
    return Completion(text="Yes" if p > 0.5 else "No", usage=Usage(40, 1, cached_tokens=30),
                      latency_s=0.1, top_logprobs=[top])


def test_margin_takes_each_side_best_spelling_and_floors_a_missing_side() -> None:
    m, ok = yes_no_margin({" yes": -0.2, "Yes": -0.5, "No": -2.0, "no": -3.0})
    assert ok and m == pytest.approx(-0.2 - -2.0)
    m, ok = yes_no_margin({"Yes": -0.1, "The": -3.0})  # "no" not in the top: floored
    assert ok and m == pytest.approx(-0.1 - FLOOR_LOGPROB)
    m, ok = yes_no_margin({"The": -0.1, "I": -3.0})  # neither: no information
    assert not ok and m == 0.0
    assert sigmoid(0.0) == 0.5 and sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0


async def test_scores_are_log_odds_and_independent_of_the_candidate_order() -> None:
    tpl = load_prompt("next_item_pointwise_titles.v1")
    fwd = await pointwise_scores(FakeModel(responder=_judge), tpl, VARS, ["tea", "pot", "oil"], TITLES)
    rev_model = FakeModel(responder=_judge)
    rev = await pointwise_scores(rev_model, tpl, VARS, ["oil", "pot", "tea"], TITLES)
    assert fwd.margins == rev.margins  # position-free: each candidate is asked alone
    assert fwd.margins["tea"] == pytest.approx(math.log(0.9 / 0.1), abs=1e-5)
    assert fwd.margins["oil"] == pytest.approx(math.log(0.05 / 0.95), abs=1e-5)
    assert fwd.p_yes["pot"] == pytest.approx(0.6)
    assert sorted(fwd.margins, key=fwd.margins.get, reverse=True) == ["tea", "pot", "oil"]
    assert fwd.answered == 1.0 and fwd.calls == 3
    assert fwd.usage == Usage(120, 3, cached_tokens=90)
    assert fwd.model_latency_s == pytest.approx(0.3)
    for call in rev_model.calls:
        assert call.max_tokens == 1 and call.top_logprobs == 20 and call.schema is None
    # one call per candidate, in the given order; the prompts differ only after the history
    prompts = [c.messages[-1]["content"] for c in rev_model.calls]
    assert [p.split("Candidate product: ")[1].split("\n")[0] for p in prompts] == [
        TITLES["oil"], TITLES["pot"], TITLES["tea"]]
    head = prompts[0].split("Candidate product:")[0]
    assert all(p.startswith(head) for p in prompts) and "2. Porcelain tea cups" in head


async def test_a_model_that_never_says_yes_or_no_is_reported() -> None:
    model = FakeModel(responder=lambda call: Completion(text="The", top_logprobs=[{"The": -0.1}]))
    res = await pointwise_scores(model, load_prompt("next_item_pointwise_titles.v1"), VARS, ["tea", "oil"], TITLES)
    assert res.answered == 0.0 and set(res.margins.values()) == {0.0}
