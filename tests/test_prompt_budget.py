"""The prompt-token budget (issue 14 item 3): the estimate is an upper bound on the packaged
tokenizer's real count, the next-item history is cut to fit the budget (and said so), and every
model step's calls, tokens, estimate and budget are in ``meta.steps``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.data.artifacts import DatasetArtifacts
from agent.domain.schemas import BehaviorEvent
from agent.llm.prompting import estimate_prompt_tokens, estimate_tokens
from agent.settings import Settings
from agent.tasks.next_item import NextItemConfig, NextItemService
from tests import test_next_item as tiny
from tests.test_next_item import explain_calls, explanation, scripted_model

store, artifacts, u1_events = tiny.store, tiny.artifacts, tiny.u1_events  # the tiny shop's fixtures

# Text of the kinds ShopLens prompts hold: upper-case Online Retail titles, mixed-case Amazon
# titles with digits, Chinese reviews and titles, and prompt boilerplate.
SAMPLES = [
    "WHITE HANGING HEART T-LIGHT HOLDER\nREGENCY CAKESTAND 3 TIER\nJUMBO BAG RED RETROSPOT\n"
    "PARTY BUNTING\nLUNCH BAG RED RETROSPOT\nSET OF 3 CAKE TINS PANTRY DESIGN\nPACK OF 72 RETROSPOT CAKE CASES",
    "Super Mario Odyssey - Nintendo Switch\nThe Legend of Zelda: Breath of the Wild (Nintendo Switch)\n"
    "Xbox One S 1TB Console - Minecraft Bundle [Discontinued]\nLogitech G502 Proteus Spectrum RGB Gaming Mouse",
    "这个手机壳质量很好，颜色和图片一样，物流也很快，下次还会再买。\n屏幕有点小，电池不耐用，客服态度一般。\n"
    "宝贝收到了，包装完好，味道不错，性价比高。",
    "E12 (3 days before): purchase x2 of LUNCH BAG RED RETROSPOT at 1.65 each; basket 536365\n"
    "Answer with the letter of the product the customer is most likely to buy next.",
]


def _gguf() -> Path:
    path = Settings().models_dir / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if not path.exists():
        pytest.skip(f"{path} not assembled: run `make setup`")
    return path


@pytest.mark.real_model
@pytest.mark.parametrize("text", SAMPLES, ids=["retail", "games", "zh", "prompt"])
def test_estimate_is_an_upper_bound_on_the_packaged_tokenizer(text: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = llama_cpp.Llama(model_path=str(_gguf()), vocab_only=True, verbose=False)
    real = len(tok.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    est = estimate_tokens(text)
    assert real <= est <= 1.6 * real, (real, est)


def test_estimate_counts_by_character_class() -> None:
    # 4 upper (0.45) + 3 lower (0.22) + 2 digits (1.0) + 1 space (0.45) + 2 CJK (0.72) = 6.35 -> 7
    assert estimate_tokens("ABCDabc12 你好") == 7
    assert estimate_tokens("") == 0
    msgs = [{"role": "system", "content": "ab"}, {"role": "user", "content": "AB"}]
    assert estimate_prompt_tokens(msgs) == 1 + 8 + 1 + 8 + 3  # 0.44 -> 1, 0.9 -> 1, markers


def shown_refs(call: tiny.FakeCall) -> list[str]:
    """The event references the explanation prompt shows ("E3 · 2 days before · ...")."""
    return re.findall(r"^(E\d+) · ", call.messages[1]["content"], flags=re.M)


async def test_history_is_cut_to_fit_the_budget_and_steps_are_recorded(
        artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]) -> None:
    cfg_full = NextItemConfig(k=2, prompt_budget_tokens=None)
    full_model = scripted_model([explanation(["A", "B"])])
    full = await NextItemService(full_model).predict("u1", u1_events, artifacts, cfg_full)
    full_est = max(s.prompt_estimate for s in full.meta.steps)
    assert [s.step for s in full.meta.steps] == ["rank", "explain"]
    assert not any("budget" in n for n in full.meta.notes)
    (call,) = explain_calls(full_model)
    assert len(shown_refs(call)) == 5  # all 5 events shown

    # a budget a few tokens under the larger prompt: the oldest events go, the newest stay
    budget = full_est - 5
    model = scripted_model([explanation(["A", "B"])])
    pred = await NextItemService(model).predict("u1", u1_events, artifacts,
                                                NextItemConfig(k=2, prompt_budget_tokens=budget))
    (call,) = explain_calls(model)
    shown = shown_refs(call)
    assert 1 <= len(shown) < 5
    note = next(n for n in pred.meta.notes if "budget" in n)
    assert note.startswith(f"history cut to {len(shown)} of 5 events to fit the {budget}-token prompt budget")
    # every prompt sent fits the budget by the estimate, and the steps say so
    for c in model.calls:
        assert estimate_prompt_tokens(c.messages) <= budget
    rank, expl = pred.meta.steps
    assert (rank.step, rank.calls, rank.prompt_budget) == ("rank", 2, budget)
    assert rank.prompt_tokens == 2 * 120 and rank.completion_tokens == 2  # the fake's usage
    assert rank.prompt_estimate <= budget and expl.prompt_estimate <= budget < full_est
    assert (expl.step, expl.calls, expl.prompt_budget) == ("explain", 1, budget)
    assert expl.prompt_estimate == estimate_prompt_tokens(call.messages)
    # the events kept are the newest, and every cited event is one of them
    kept = {e.event_id for e in u1_events[-len(shown):]}
    assert all(ev.event_id in kept for it in pred.items for ev in it.evidence)


async def test_a_budget_too_small_for_one_event_is_noted_and_the_prompt_sent(
        artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]) -> None:
    model = scripted_model([explanation(["A", "B"])])
    pred = await NextItemService(model).predict("u1", u1_events, artifacts,
                                                NextItemConfig(k=2, prompt_budget_tokens=50))
    assert any(n.startswith("prompt over budget: ~") and "50 allowed" in n for n in pred.meta.notes)
    assert len(model.calls) == 3  # still answered: two ranking passes and the explanation


async def test_the_fast_path_estimates_nothing(artifacts: DatasetArtifacts, u1_events: list[BehaviorEvent]) -> None:
    pred = await NextItemService(None).predict("u1", u1_events, artifacts,
                                               NextItemConfig(k=2, prompt_budget_tokens=10))
    assert pred.meta.steps == [] and not any("budget" in n for n in pred.meta.notes)

