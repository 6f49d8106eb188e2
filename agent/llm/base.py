"""The one seam to the model: a small protocol, its result types and its errors.

Everything that talks to a language model goes through `ChatModel`. Adapters live beside it
(`openai_compat.py` for any OpenAI-compatible server: vLLM, llama-cpp-python, OpenAI) and so do
the fakes used by unit tests (`fake.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from agent.domain.errors import (  # re-exported: the model seam's errors
    ModelRequestError,
    ModelUnavailableError,
    OutputValidationError,
    ShopLensError,
)

__all__ = ["ChatModel", "Completion", "Message", "ModelRequestError", "ModelUnavailableError",
           "OutputValidationError", "ShopLensError", "Usage"]

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class Usage:
    """Token counts of one call (or a sum of calls).

    `cached_tokens` is the part of `prompt_tokens` the server reused from its prefix cache
    (``usage.prompt_tokens_details.cached_tokens``; 0 where the server does not report it).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens


@dataclass
class Completion:
    """One model answer.

    `top_logprobs` holds, per generated token position, the top alternatives as
    {token_text: natural-log probability}; empty when not requested or not supported.
    """

    text: str
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    finish_reason: str | None = None
    model: str = ""


@runtime_checkable
class ChatModel(Protocol):
    """Messages (+ optional JSON schema) in, a Completion out; or free text streamed.

    Attributes:
        model_id: the id recorded in every answer's `meta`.
    """

    model_id: str

    async def complete(
        self,
        messages: list[Message],
        *,
        schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        """Run one completion.

        Args:
            messages: chat messages, oldest first.
            schema: a JSON schema the answer must follow (constrained decoding where the
                server supports it); None for free text.
            max_tokens: generation cap.
            temperature: 0 for deterministic answers.
            top_logprobs: if > 0, ask for that many alternatives per generated token.

        Raises:
            ModelUnavailableError: the server cannot be reached, timed out or answered 5xx.
            ModelRequestError: the server rejected the request (4xx other than 429).
        """
        ...

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> AsyncIterator[str]:
        """Stream a free-text completion as text chunks (an async generator).

        Raises:
            ModelUnavailableError: the server cannot be reached, timed out or failed mid-stream.
            ModelRequestError: the server rejected the request.
        """
        ...
