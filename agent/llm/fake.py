"""Fakes of `ChatModel` for fast unit tests: a queue of canned replies plus a call log."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.llm.base import Completion, Message, ModelUnavailableError, Usage


@dataclass
class FakeCall:
    messages: list[Message]
    schema: dict[str, Any] | None
    max_tokens: int
    top_logprobs: int


Reply = Completion | str | Exception


@dataclass
class FakeModel:
    """Answers from a queue; records every call.

    Each queued reply is a `Completion`, a plain string (wrapped in a Completion) or an
    exception (raised). `responder`, if given, is used once the queue is empty: it gets the
    call and returns a reply. With neither, the fake raises `ModelUnavailableError`, so a test
    that makes an unexpected call fails loudly.
    """

    replies: deque[Reply] = field(default_factory=deque)
    responder: Callable[[FakeCall], Reply] | None = None
    model_id: str = "fake-model"
    calls: list[FakeCall] = field(default_factory=list)

    @classmethod
    def with_replies(cls, replies: Iterable[Reply]) -> FakeModel:
        return cls(replies=deque(replies))

    async def complete(
        self,
        messages: list[Message],
        *,
        schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        call = FakeCall(messages, schema, max_tokens, top_logprobs)
        self.calls.append(call)
        if self.replies:
            reply = self.replies.popleft()
        elif self.responder is not None:
            reply = self.responder(call)
        else:
            raise ModelUnavailableError("FakeModel: no reply queued for this call")
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, str):
            return Completion(text=reply, usage=Usage(10, 5), model=self.model_id)
        return reply

    async def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> AsyncIterator[str]:
        """The next reply (as `complete` picks it), streamed word by word; logged as a call."""
        comp = await self.complete(messages, max_tokens=max_tokens, temperature=temperature)
        words = comp.text.split(" ")
        for i, w in enumerate(words):
            yield w if i == len(words) - 1 else w + " "
