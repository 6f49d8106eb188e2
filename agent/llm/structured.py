"""One schema-constrained model call with pydantic validation and a bounded repair loop.

Every task that asks the model for structured output goes through `structured_call`: the
JSON schema constrains decoding on the server, pydantic re-validates with request data as
validation context, and on failure the errors are fed back for at most `max_attempts - 1`
repairs. Then it raises `OutputValidationError`, and the task answers with a labelled fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from agent.domain.predictions.common import ModelStep
from agent.llm.base import ChatModel, Message, OutputValidationError, Usage

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

    Args:
        messages: the rendered prompt.
        output: the pydantic model the answer must validate against.
        json_schema: schema sent for constrained decoding (default: `output`'s own schema).
        context: pydantic validation context (e.g. the allowed labels and event refs).
        trace: accumulates tokens, attempts and latency across calls.

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
        try:
            return output.model_validate_json(text, context=context)
        except ValidationError as e:
            errors = format_errors(e)
        if attempt < max_attempts:
            messages = [
                *messages,
                {"role": "assistant", "content": text},
                {"role": "user", "content": "Your JSON answer was invalid:\n- " + "\n- ".join(errors)
                 + "\nReply again with the corrected JSON only."},
            ]
    raise OutputValidationError(
        f"{output.__name__} failed validation after {max_attempts} attempts",
        attempts=max_attempts, last_output=text, errors=errors,
    )
