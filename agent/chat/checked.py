"""The chat's answer, verified sentence by sentence as it streams (`agent.domain.verify`).

The model's answer streams as usual, but each sentence is shown only once it is complete and
checked against the tool's result (`chat_facts`): the products it names are in the result, its
event references and numbers are the result's, a "most likely" names the top-ranked item first,
a risk or intent word agrees with the probability. At the first wrong sentence the stream is
stopped and one repair call continues the answer from the last verified sentence, with the
violations fed back; a second wrong sentence stops it for good and the template answer follows,
labelled. Nothing the verifier rejected reaches the merchandiser, and an answer the token limit
cut mid-sentence is treated the same way (the repair finishes it), never shown cut.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from agent.chat.results import ChurnSegment, NextItems, TaskResult, ToolResult, result_facts
from agent.domain.predictions.common import Verification
from agent.domain.verify import (
    Direction,
    Facts,
    TitleIndex,
    claims_popularity,
    refs_in,
    verify_sentence,
)
from agent.llm.base import ChatModel, Message

# A sentence ends at . ! ? followed by a space (not after a list number like "1."), at a Chinese
# full stop, or at a line break (`split_sentences` keeps a lead-in ending with a colon, "most
# likely to buy:", with the list's first line, so an ordering claim is checked with its item).
_END = re.compile(r"(?<=[.!?])(?<!\b\d\.)(?<!\b\d\d\.)\s+|(?<=[。！？；])|\n+")
LABEL = {"en": "[template] ", "zh": "[模板] "}


def split_sentences(buf: str) -> tuple[list[str], str]:
    """The complete sentences at the start of `buf` (each with its trailing space or line
    break) and the incomplete rest: ``"A b. C d"`` -> ``(["A b. "], "C d")``. A sentence ending
    with a colon (a list's lead-in) is one with the next."""
    out, start = [], 0
    for m in _END.finditer(buf):
        if buf[start:m.start()].rstrip().endswith((":", "：")):
            continue  # a lead-in: kept with what follows it
        if m.end() > start:
            out.append(buf[start:m.end()])
            start = m.end()
    return out, buf[start:]


def chat_facts(result: ToolResult, question: str, catalogue: TitleIndex) -> Facts:
    """What a chat answer about `result` may say: the products its facts name (verbatim), its
    event references, its numbers and the question's; a ranking claim names a next-item
    result's top item first; popularity only if the facts speak of it; a churn or intent
    result's risk words on its side."""
    text = result_facts(result)
    titles = catalogue.named_as_written(text)
    top, ranked = None, [it.title for it in result.prediction.items] if isinstance(result, NextItems) else []
    if ranked:
        titles += ranked
        top = ranked[0]
    direction: Direction | None = None
    if isinstance(result, TaskResult) and result.tool == "churn":
        direction = result.data.get("risk_band")
    elif isinstance(result, TaskResult) and result.tool == "intent" and "probability" in result.data:
        direction = "high" if result.data["probability"] >= 0.5 else "low"
    return Facts(titles=titles, refs=refs_in(text), numbers=[text, question], may_rank_first=True,
                 top_title=None if isinstance(result, ChurnSegment) else top, ranked=ranked,
                 popular=claims_popularity(text), direction=direction)


@dataclass
class Outcome:
    """What the verifier did to one chat answer (`Verification` counts) and its source."""

    checked: int = 0
    verified: int = 0
    repaired: int = 0
    replaced: int = 0
    violations: list[str] = field(default_factory=list)
    source: Literal["model", "template"] = "model"

    def verification(self) -> Verification:
        return Verification(checked=self.checked, verified=self.verified, repaired=self.repaired,
                            replaced=self.replaced, violations=self.violations)


async def checked_answer(model: ChatModel, messages: list[Message], facts: Facts, catalogue: TitleIndex,
                         template: str, lang: Literal["en", "zh"], outcome: Outcome, *,
                         max_tokens: int = 320, after: str = "") -> AsyncIterator[str]:
    """Stream the model's answer to `messages`, one verified sentence at a time (see the module
    docstring); `outcome` is filled in as it goes. `after`: text already shown before the
    model's (the template's ranking), so a template that follows starts on a new paragraph.

    Raises:
        ModelUnavailableError: from the model (the caller falls back to the template).
    """
    said = ""
    msgs = messages
    for attempt in (1, 2):
        wrong: tuple[str, list[str]] | None = None
        buf, n_chunks = "", 0
        chunks = model.stream(msgs, max_tokens=max_tokens, temperature=0.2)
        try:
            async for chunk in chunks:
                n_chunks += 1  # a streamed chunk is a token on the OpenAI-compatible servers
                done, buf = split_sentences(buf + chunk)
                for sent in done:
                    if not sent.strip():
                        continue
                    v = verify_sentence(sent.strip(), facts, catalogue)
                    if v:
                        wrong = (sent, v)
                        break
                    outcome.checked += 1
                    outcome.verified += 1
                    said += sent
                    yield sent
                if wrong:
                    break
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        if wrong is None and buf.strip():
            v = verify_sentence(buf.strip(), facts, catalogue)
            if n_chunks >= max_tokens - 1:  # the token limit, not the model, ended it: no silent cut
                v = [*v, f"is cut off at the {max_tokens}-token limit mid-sentence; finish in fewer words"]
            if v:
                wrong = (buf, v)
            else:
                outcome.checked += 1
                outcome.verified += 1
                said += buf
                yield buf
        if wrong is None:
            if attempt == 2:
                outcome.repaired += 1
            return
        outcome.violations += [("repair: " if attempt == 2 else "") + f"'{wrong[0].strip()[:80]}': {x}" for x in wrong[1]]
        if attempt == 1:
            outcome.checked += 1
            msgs = [*messages, {"role": "assistant", "content": said + wrong[0]},
                    {"role": "user", "content": "Your last sentence is not supported by the facts:\n- "
                     + "\n- ".join(wrong[1]) + "\nContinue the answer from before that sentence, corrected; "
                     "do not repeat what is already said."}]
    outcome.replaced += 1
    outcome.source = "template" if not said else "model"
    yield ("\n\n" if said or after else "") + LABEL[lang] + template
