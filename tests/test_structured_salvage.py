"""Salvaging model replies a lenient reader would accept (issue 17), before a repair round.

Each failure mode is a canned FakeModel reply: salvaged, validated with the schema and its
context, no repair call made (the fake has no second reply, so one would fail loudly), counted
in the trace and in `meta.salvaged`. A reply the salvage cannot read without inventing content
(cut inside a value; a missing required field; a ref outside the history) takes the normal
repair round. Hypothesis: any valid object, wrapped the ways models wrap it, comes back equal.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

from agent.domain.errors import OutputValidationError
from agent.domain.predictions.common import Cited
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import Completion, Usage
from agent.llm.fake import FakeModel
from agent.llm.salvage import salvage_json
from agent.llm.structured import CallTrace, structured_call
from agent.tasks.churn import ChurnService
from agent.tasks.common import make_meta


class Answer(Cited):
    """A task-shaped answer: a closed label, a reason, event refs checked against the context."""

    label: Literal["low", "medium", "high"]
    reason: str = Field(min_length=3, max_length=200)
    evidence: list[str] = Field(min_length=1)


GOOD: dict[str, Any] = {"label": "high", "reason": "Reorders mugs every month, none since May.",
                        "evidence": ["E2", "E3"]}
STRICT = json.dumps(GOOD)
CONTEXT = {"refs": {"E1", "E2", "E3"}}
PROMPT = [{"role": "user", "content": "Answer as JSON."}]


def cut(text: str) -> Completion:
    """A reply that hit the token limit."""
    return Completion(text=text, usage=Usage(50, 256), finish_reason="length")


WHITESPACE_RUN = " \n" * 300 + " " * 400
SALVAGEABLE: dict[str, str | Completion] = {
    "code fence": f"```json\n{STRICT}\n```",
    "code fence after prose": f"Here is the answer:\n\n```\n{json.dumps(GOOD, indent=2)}\n```\nHope it helps!",
    "think block": f"<think>The user reorders {{mugs}}; label it high.</think>\n{STRICT}",
    "think block closed by the template": f"The user reorders mugs {{monthly}}.\n</think>\n\n{STRICT}",
    "single quotes": "{'label': 'high', 'reason': 'Reorders mugs every month, none since May.', "
                     "'evidence': ['E2', 'E3']}",
    "trailing commas": '{"label": "high", "reason": "Reorders mugs every month, none since May.", '
                       '"evidence": ["E2", "E3",],}',
    "whitespace run to the token limit": cut(STRICT[:-1] + WHITESPACE_RUN),
    "whitespace run after a comma": cut(STRICT[:-1] + "," + WHITESPACE_RUN),
    "valid object then text": STRICT + "\n\nLet me know if you need more.",
    "unquoted keys (read by json-repair)": '{label: "high", reason: "Reorders mugs every month, none since May.", '
                                           'evidence: ["E2", "E3"]}',
}


@pytest.mark.parametrize("reply", SALVAGEABLE.values(), ids=SALVAGEABLE.keys())
async def test_salvaged_without_a_repair_call_and_counted(reply: str | Completion) -> None:
    model = FakeModel.with_replies([reply])  # a repair call would find no reply and fail
    trace = CallTrace()
    out = await structured_call(model, PROMPT, Answer, context=CONTEXT, max_tokens=256, trace=trace)
    assert out.model_dump() == GOOD
    assert len(model.calls) == 1 and trace.attempts == 1
    assert trace.salvaged == 1
    assert any("salvaged" in n for n in trace.notes), trace.notes
    meta = make_meta("test", model, trace, [], 0.0)
    assert meta.salvaged == 1 and meta.attempts == 1 and not meta.degraded


async def test_valid_object_then_a_whitespace_run_is_strict_json_and_noted() -> None:
    model = FakeModel.with_replies([cut(STRICT + WHITESPACE_RUN)])
    trace = CallTrace()
    out = await structured_call(model, PROMPT, Answer, context=CONTEXT, max_tokens=256, trace=trace)
    assert out.model_dump() == GOOD
    assert (len(model.calls), trace.salvaged) == (1, 0)  # JSON as it stands: nothing to salvage
    assert any("ran to the token limit (256) in a run of 1000 whitespace" in n for n in trace.notes), trace.notes


NOT_SALVAGEABLE: dict[str, tuple[str | Completion, str]] = {
    # cut inside a string: closing it would invent a shorter reason
    "cut inside a string": (cut('{"label": "high", "reason": "Reorders mu'), "Invalid JSON"),
    "cut after a key's colon": (cut('{"label": "high", "evidence": ["E2"], "reason":  \n  '), "Invalid JSON"),
    "cut inside a number": (cut('{"label": "high", "score": 12'), "Invalid JSON"),
    # read leniently it is JSON, but the schema still rejects it: never filled in
    "missing required field": ('```json\n{"label": "high", "evidence": ["E2"]}\n```', "reason: Field required"),
    "ref outside the history": ("{'label': 'high', 'reason': 'Reorders mugs.', 'evidence': ['E9'],}",
                                "evidence ['E9'] are not event references"),
    "label outside the set": ('<think>hmm</think>{"label": "urgent", "reason": "Reorders.", "evidence": ["E1"]}',
                              "label: Input should be"),
    "unclosed think block": (cut("<think>The user reorders mugs {monthly}, so " + "x" * 40), "Invalid JSON"),
    "prose only": ("I cannot answer that.", "Invalid JSON"),
}


@pytest.mark.parametrize(("reply", "error"), NOT_SALVAGEABLE.values(), ids=NOT_SALVAGEABLE.keys())
async def test_not_salvageable_takes_the_repair_round(reply: str | Completion, error: str) -> None:
    model = FakeModel.with_replies([reply, STRICT])
    trace = CallTrace()
    out = await structured_call(model, PROMPT, Answer, context=CONTEXT, trace=trace)
    assert out.model_dump() == GOOD
    assert len(model.calls) == 2 and trace.salvaged == 0
    repair = model.calls[1].messages[-1]["content"]
    assert repair.startswith("Your JSON answer was invalid:") and error in repair, repair


async def test_valid_json_that_breaks_the_schema_is_not_salvaged() -> None:
    bad = json.dumps(GOOD | {"label": "HIGH!"})
    model = FakeModel.with_replies([bad, bad])
    trace = CallTrace()
    with pytest.raises(OutputValidationError) as e:
        await structured_call(model, PROMPT, Answer, context=CONTEXT, trace=trace)
    assert e.value.attempts == 2 and trace.salvaged == 0
    assert e.value.errors[0].startswith("label:")


async def test_a_task_answer_counts_its_salvage_in_meta() -> None:
    t0 = datetime(2011, 1, 1, tzinfo=UTC)
    catalog = {"A": CatalogItem(item_id="A", title="RED RETRO MUG", price=1.0)}
    events = [BehaviorEvent(user_id="u1", item_id="A", event_type="purchase", timestamp=t0 + timedelta(days=d),
                            quantity=1, unit_price=1.0, basket_id=f"o{d}") for d in (0, 10, 40)]
    yes = Completion(text="no", usage=Usage(100, 1), top_logprobs=[{"yes": -2.3, "no": -0.1}])
    fenced = '```json\n{"action": "loyalty_reward", "reason": "orders every few weeks", "evidence": ["E3"],}\n```'
    model = FakeModel.with_replies([yes, fenced])
    p = await ChurnService(model).predict("u1", events, catalog, as_of=t0 + timedelta(days=50))
    assert p.reason_source == "model" and p.action == "loyalty_reward"
    assert p.meta.salvaged == 1 and p.meta.attempts == 2 and not p.meta.degraded
    assert len(model.calls) == 2


# ---- the salvage itself: properties ----------------------------------------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=20))
_JSON = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_OBJECTS = st.dictionaries(st.text(max_size=8), _JSON, min_size=1, max_size=5)
_PROSE = st.text(st.characters(blacklist_characters="{}[]`<>"), max_size=30)  # prose around the JSON
_SPACE = st.text(" \n\t\r", max_size=600)


@settings(max_examples=300, deadline=None)
@given(obj=_OBJECTS, indent=st.sampled_from([None, 2]), think=st.none() | st.text(max_size=40),
       fence=st.sampled_from([None, "```", "```json"]), before=_PROSE, after=_PROSE, space=_SPACE)
def test_any_valid_object_wrapped_comes_back_equal(obj: dict[str, Any], indent: int | None, think: str | None,
                                                   fence: str | None, before: str, after: str, space: str) -> None:
    text = json.dumps(obj, indent=indent)
    if fence is not None:
        text = f"{before}\n{fence}\n{text}\n```\n{after}"
    if think is not None:
        text = f"<think>{think.replace('</think>', '')}</think>\n{text}"
    text += space
    salvaged = salvage_json(text)
    assert salvaged is not None and json.loads(salvaged) == obj


@settings(max_examples=300, deadline=None)
@given(obj=_OBJECTS, at=st.integers(min_value=1))
def test_a_cut_reply_is_refused_or_a_prefix_of_what_was_said(obj: dict[str, Any], at: int) -> None:
    """Cut anywhere: either refused, or every key and value it returns was in the reply whole
    (nothing shortened, nothing invented; only what came after the cut is missing)."""
    full = json.dumps(obj)
    salvaged = salvage_json(full[: at % len(full)])
    if salvaged is None:
        return
    leaves = _leaves(json.loads(salvaged))
    assert leaves <= _leaves(obj), leaves - _leaves(obj)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_never_raises_on_any_text(text: str) -> None:
    out = salvage_json(text)
    assert out is None or isinstance(json.loads(out), dict | list)


def _leaves(v: Any) -> set[str]:
    """Every key and scalar in a JSON value, as JSON text."""
    if isinstance(v, dict):
        return {json.dumps(k) for k in v} | {s for x in v.values() for s in _leaves(x)}
    if isinstance(v, list):
        return {s for x in v for s in _leaves(x)}
    return {json.dumps(v)}
