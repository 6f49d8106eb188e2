"""Verified model sentences: check each one (`agent.domain.verify`), repair once, else template.

The flow every task uses for the text its model writes:

1. the task's structured call has returned a valid answer (`structured_call`);
2. each sentence of it is checked against its `Facts` (`verify_sentence`);
3. if any is wrong, one repair call gets the whole answer back with the violations listed, and
   its sentences are checked again;
4. per sentence, the first version that verified is used (as written, else repaired); a
   sentence wrong both times is replaced by the task's template sentence, labelled.

`trace.verification` accumulates the counts (`Verification`); `make_meta` puts them in the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from agent.domain.errors import ModelUnavailableError, OutputValidationError
from agent.domain.history import HistoryView
from agent.domain.predictions import AudienceReason, ChurnAnswer, IntentAnswer
from agent.domain.predictions.common import Verification
from agent.domain.schemas import CatalogItem
from agent.domain.verify import Direction, Facts, TitleIndex, verify_sentence
from agent.llm.base import ChatModel, Message
from agent.llm.structured import CallTrace, structured_call

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R", ChurnAnswer, IntentAnswer, AudienceReason)  # one-sentence answers: a reason and its evidence

# sentence key ("A", "summary", "reason") -> (the sentence, what it may say)
Sentences = Mapping[str, tuple[str, Facts]]


@dataclass
class Checked(Generic[T]):
    """Which answer to take each sentence from.

    Attributes:
        pick: sentence key -> the answer whose sentence verified (the first, else the repaired
            one), or None: the sentence is replaced by the template.
    """

    pick: dict[str, T | None]

    def ok(self, key: str) -> bool:
        return self.pick.get(key) is not None


def check(sentences: Sentences, catalogue: TitleIndex) -> dict[str, list[str]]:
    """Violations per sentence key (only keys with at least one)."""
    out = {}
    for key, (text, facts) in sentences.items():
        v = verify_sentence(text, facts, catalogue)
        if v:
            out[key] = v
    return out


async def verify_answer(
    model: ChatModel, messages: list[Message], answer: T, sentences: Callable[[T], Sentences],
    catalogue: TitleIndex, trace: CallTrace, *, json_schema: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None, max_tokens: int = 512,
) -> Checked[T]:
    """Check the model's `answer` (the reply to `messages`, its raw text the last of
    ``trace.raw_outputs``), repair once if any sentence is wrong, and say where each sentence
    comes from. A repair call that fails (model down, invalid JSON) leaves the wrong sentences
    to the template; it is said in ``trace.notes``. Counts go to ``trace.verification``.

    Args:
        sentences: the answer's model-written sentences with their facts, by key.
        json_schema, context, max_tokens: as for `structured_call` (the repair is the same call).
    """
    first = sentences(answer)
    wrong = check(first, catalogue)
    pick: dict[str, T | None] = {k: answer for k in first if k not in wrong}
    violations = [f"{k}: {v}" for k, vs in wrong.items() for v in vs]
    repaired_ok = 0
    if wrong:
        feedback = "\n".join(f"- {line}" for line in violations)
        repair = [*messages, {"role": "assistant", "content": (trace.raw_outputs[-1:] or [""])[0].rstrip()},
                  {"role": "user", "content": "Some sentences of your answer are not supported by the data:\n"
                   f"{feedback}\nReply again with the whole JSON answer, those sentences corrected and the "
                   "others unchanged."}]
        second: T | None = None
        try:
            second = await structured_call(model, repair, type(answer), json_schema=json_schema, context=context,
                                           max_attempts=1, max_tokens=max_tokens, trace=trace)
        except (OutputValidationError, ModelUnavailableError) as e:
            trace.notes.append(f"verifier: the repair call failed ({type(e).__name__}); the wrong "
                               "sentences are replaced by the template")
        again = sentences(second) if second is not None else {}
        still = check(again, catalogue) if again else {}
        for k in wrong:
            if second is not None and k in again and k not in still:
                pick[k], repaired_ok = second, repaired_ok + 1
            else:
                pick[k] = None
                violations += [f"repair: {k}: {v}" for v in still.get(k, [])]
    v = trace.verification or Verification(checked=0, verified=0, repaired=0, replaced=0)
    trace.verification = Verification(
        checked=v.checked + len(first), verified=v.verified + len(first) - len(wrong),
        repaired=v.repaired + repaired_ok, replaced=v.replaced + len(wrong) - repaired_ok,
        violations=v.violations + violations)
    return Checked(pick)


def cited_facts(messages: list[Message], hist: HistoryView, refs: Sequence[str], catalog: Mapping[str, CatalogItem],
                *, titles: Sequence[str] = (), direction: Direction | None = None) -> Facts:
    """What a reason citing `refs` may say: the titles of its cited events' items (and `titles`,
    e.g. the item asked about), those refs only (its text and its evidence name the same
    events), the numbers of the prompt it answers (what the model was shown), and, with
    `direction`, risk or intent words on that side."""
    items = [x.event.item_id for r in refs if (x := hist.resolve(r)) is not None]
    cited = [catalog[i].title for i in items if i in catalog]
    return Facts(titles=[*titles, *cited], refs=list(refs), event_titles=cited,
                 numbers=[str(m["content"]) for m in messages], direction=direction,
                 may_rank_first=True)  # no ranking to contradict: "most likely to buy" is a direction word


async def verified_reason(
    model: ChatModel, messages: list[Message], answer: R, hist: HistoryView, catalog: Mapping[str, CatalogItem],
    trace: CallTrace, *, titles: Sequence[str] = (), direction: Direction | None = None,
    json_schema: dict[str, Any] | None = None, context: dict[str, Any] | None = None, max_tokens: int = 160,
    catalogue: TitleIndex | None = None,
) -> R | None:
    """`verify_answer` for a one-sentence answer (a `Cited` reason with its evidence: churn,
    purchase intent, session intent, an audience's targeting reason): the answer whose reason verified (as written, else
    repaired), or None when the task's template reason must be shown instead. `catalogue`: the
    catalog's `TitleIndex` when the caller holds one (else built here, ~20 ms on 4k titles)."""
    checked = await verify_answer(
        model, messages, answer,
        lambda a: {"reason": (a.reason, cited_facts(messages, hist, a.evidence, catalog, titles=titles,
                                                    direction=direction))},
        catalogue or TitleIndex(it.title for it in catalog.values()), trace, json_schema=json_schema, context=context,
        max_tokens=max_tokens)
    return checked.pick["reason"]
