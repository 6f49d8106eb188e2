"""One schema-constrained model call with pydantic validation and a bounded repair loop.

Every task that asks the model for structured output goes through `structured_call`: the
JSON schema constrains decoding on the server, pydantic re-validates with request data as
validation context, and on failure the errors are fed back for at most `max_attempts - 1`
repairs. Then it raises `OutputValidationError`, and the task answers with a labelled fallback.

A reply that is not JSON as it stands but that a lenient reader would accept (a code fence, a
``<think>`` block, single quotes, trailing commas, a whitespace run that hit the token limit
before the closing brace) is salvaged first (`agent.llm.salvage.salvage_json`) and validated
with the same schema and context; that costs no repair round and is counted in
``CallTrace.salvaged`` (``meta.salvaged``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from agent.domain.predictions.common import ModelStep, Verification
from agent.llm.base import ChatModel, Completion, Message, OutputValidationError, Usage
from agent.llm.salvage import salvage_json

T = TypeVar("T", bound=BaseModel)


@dataclass
class CallTrace:
    """What the model calls of one request cost; shared across a task's calls."""

    usage: Usage = field(default_factory=Usage)
    attempts: int = 0
    model_latency_s: float = 0.0
    degraded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw_outputs: list[str] = field(default_factory=list)
    steps: list[ModelStep] = field(default_factory=list)  # per model step, with its prompt budget
    salvaged: int = 0  # replies accepted after a lenient parse (no repair round spent)
    verification: Verification | None = None  # the verifier's counts over the model's sentences


def format_errors(e: ValidationError) -> list[str]:
    """Pydantic errors as 'field.path: message' lines the model can act on."""
    return [f"{'.'.join(map(str, err['loc'])) or 'answer'}: {err['msg']}" for err in e.errors()]


async def structured_call(
    model: ChatModel,
    messages: list[Message],
    output: type[T],
    *,
    json_schema: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    max_attempts: int = 2,
    max_tokens: int = 512,
    trace: CallTrace | None = None,
) -> T:
    """Ask for JSON matching `output`, validate, repair at most `max_attempts - 1` times.

    A reply that is not strict JSON is first salvaged (`salvage_json`: fence, think block,
    quotes, trailing commas, a whitespace run at the token limit) and validated the same way;
    a salvaged answer is returned at once and counted in ``trace.salvaged``.

    Args:
        messages: the rendered prompt.
        output: the pydantic model the answer must validate against.
        json_schema: schema sent for constrained decoding (default: `output`'s own schema).
        context: pydantic validation context (e.g. the allowed labels and event refs).
        max_attempts: model calls at most, repairs included.
        max_tokens: each call's generation cap in tokens; keep it near the answer's size, since a
            reply stalling in whitespace holds a model slot until it reaches the cap.
        trace: accumulates tokens, attempts, salvages and latency across calls.

    Returns:
        The validated `output` instance.

    Raises:
        OutputValidationError: still invalid after `max_attempts` (carries the last raw output
            and the errors).
        ModelUnavailableError: from the model.
    """
    trace = trace if trace is not None else CallTrace()
    schema = json_schema or output.model_json_schema()
    errors: list[str] = []
    text = ""
    for attempt in range(1, max_attempts + 1):
        comp = await model.complete(messages, schema=schema, max_tokens=max_tokens)
        trace.attempts += 1
        trace.usage.add(comp.usage)
        trace.model_latency_s += comp.latency_s
        text = comp.text
        trace.raw_outputs.append(text)
        note = whitespace_stall(comp, max_tokens)
        if note:
            trace.notes.append(note)
        try:
            return output.model_validate_json(text, context=context)
        except ValidationError as e:
            errors = format_errors(e)
            # Only a reply that is not JSON as it stands is salvaged; JSON that breaks the schema
            # needs a repair round (the salvage never changes what the model said).
            salvaged = salvage_json(text) if _not_json(e) else None
            if salvaged is not None:
                try:
                    answer = output.model_validate_json(salvaged, context=context)
                except ValidationError as e2:  # not a valid answer even read leniently: say both
                    errors += format_errors(e2)
                else:
                    trace.salvaged += 1
                    trace.notes.append(f"{output.__name__}: reply salvaged by a lenient JSON parse "
                                       f"({errors[0]}), no repair round spent")
                    return answer
        if attempt < max_attempts:
            messages = [
                *messages,
                {"role": "assistant", "content": text.rstrip()},  # a whitespace run is no use to it
                {"role": "user", "content": "Your JSON answer was invalid:\n- " + "\n- ".join(errors)
                 + "\nReply again with the corrected JSON only."},
            ]
    raise OutputValidationError(
        f"{output.__name__} failed validation after {max_attempts} attempts",
        attempts=max_attempts, last_output=text, errors=errors,
    )


def _not_json(e: ValidationError) -> bool:
    """True when pydantic refused the text as JSON before looking at the schema."""
    return any(err["type"] == "json_invalid" for err in e.errors())


# A reply that ends in this much whitespace at the token limit was stalling, not answering.
_STALL_CHARS = 16


def whitespace_stall(comp: Completion, max_tokens: int) -> str | None:
    """A note when `comp` ran to the token limit inside a whitespace run (a known failure of
    guided decoding: the grammar allows whitespace between JSON tokens and a small model keeps
    emitting it), else None. The call held its slot for up to `max_tokens` generated tokens;
    keep each call's `max_tokens` close to its answer's size (and `GuardConfig.max_tokens_cap`)."""
    tail = len(comp.text) - len(comp.text.rstrip())
    if comp.finish_reason != "length" or tail < _STALL_CHARS:
        return None
    return (f"model reply ran to the token limit ({max_tokens}) in a run of {tail} whitespace "
            "characters")
