"""Adapter for any OpenAI-compatible chat server: vLLM, llama-cpp-python's server, OpenAI.

The dialect differences live here and nowhere else:

* structured output: vLLM and OpenAI take ``response_format={"type": "json_schema", ...}``;
  llama-cpp-python's server takes ``{"type": "json_object", "schema": ...}`` and answers 500 to
  ``json_schema``.
* log-probabilities: all three take ``logprobs=True, top_logprobs=N`` on chat completions
  (vLLM caps N at its ``--max-logprobs``, default 20; the embedded llama-cpp-python server
  answers them for one generated token from the last position's logits,
  `agent.llm.servers.llama_app`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import httpx
import openai

from agent.llm.base import Completion, Message, ModelRequestError, ModelUnavailableError, Usage

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

Dialect = Literal["vllm", "llamacpp", "openai"]


def response_format_for(dialect: Dialect, schema: dict[str, Any]) -> dict[str, Any]:
    """The `response_format` body field that makes `dialect`'s server enforce `schema`."""
    if dialect == "llamacpp":
        return {"type": "json_object", "schema": schema}
    return {
        "type": "json_schema",
        "json_schema": {"name": schema.get("title", "answer"), "schema": schema, "strict": True},
    }


async def detect_dialect(base_url: str, api_key: str, timeout_s: float = 10.0) -> Dialect:
    """Guess the server kind from ``GET /v1/models`` (vLLM says ``owned_by: vllm``;
    llama-cpp-python's model objects say ``owned_by: me``). Falls back to "openai".

    Raises:
        ModelUnavailableError: the server did not answer.
    """
    url = base_url.rstrip("/") + "/models"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            r = await client.get(url, headers={"Authorization": f"Bearer {api_key}"})
            r.raise_for_status()
            data = r.json().get("data") or [{}]
    except (httpx.HTTPError, ValueError) as e:
        raise ModelUnavailableError(f"model server at {base_url} did not answer: {e}") from e
    owner = str(data[0].get("owned_by", "")).lower()
    if owner == "vllm":
        return "vllm"
    if owner in {"me", "llamacpp", "llama.cpp"}:
        return "llamacpp"
    return "openai"


class OpenAICompatModel:
    """`ChatModel` over an OpenAI-compatible HTTP server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8001/v1``.
        model: the served model name.
        dialect: request dialect (see module docstring).
        api_key: bearer token; local servers ignore it.
        timeout_s: per-request timeout in seconds.
        model_id: the id recorded in result envelopes (defaults to `model`).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        dialect: Dialect,
        *,
        api_key: str = "not-needed",
        timeout_s: float = 120.0,
        model_id: str | None = None,
    ):
        self.base_url = base_url
        self.model = model
        self.dialect = dialect
        self.model_id = model_id or model
        # Retries are ours (bounded, in the pipeline), not the SDK's silent ones.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )

    async def complete(
        self,
        messages: list[Message],
        *,
        schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if schema is not None:
            kwargs["response_format"] = response_format_for(self.dialect, schema)
        if top_logprobs > 0:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = top_logprobs
        t0 = time.perf_counter()
        try:
            resp = await self._client.chat.completions.create(**kwargs)
        except openai.APIError as e:
            raise self._mapped(e) from e
        latency = time.perf_counter() - t0
        choice = resp.choices[0]
        tops: list[dict[str, float]] = []
        if choice.logprobs is not None and choice.logprobs.content:
            for tok in choice.logprobs.content:
                alts = {a.token: a.logprob for a in (tok.top_logprobs or [])}
                alts.setdefault(tok.token, tok.logprob)
                tops.append(alts)
        details = getattr(resp.usage, "prompt_tokens_details", None)
        usage = Usage(
            prompt_tokens=getattr(resp.usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(resp.usage, "completion_tokens", 0) or 0,
            cached_tokens=getattr(details, "cached_tokens", 0) or 0,
        )
        return Completion(
            text=choice.message.content or "",
            usage=usage,
            latency_s=latency,
            top_logprobs=tops,
            finish_reason=choice.finish_reason,
            model=resp.model or self.model,
        )

    async def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
    ) -> AsyncIterator[str]:
        """Stream a free-text completion (``stream=True``), yielding content deltas.

        Raises:
            ModelUnavailableError / ModelRequestError: as `complete`, before or during the stream.
        """
        try:
            # Message is a plain dict[str, str]; the SDK's param type is a union of TypedDicts
            # with the same {"role", "content"} shape (the server validates the roles).
            events = await self._client.chat.completions.create(
                model=self.model, messages=cast("list[ChatCompletionMessageParam]", messages),
                max_tokens=max_tokens, temperature=temperature, stream=True)
            async for ev in events:
                if ev.choices and ev.choices[0].delta.content:
                    yield ev.choices[0].delta.content
        except openai.APIError as e:
            raise self._mapped(e) from e

    def _mapped(self, e: openai.APIError) -> ModelUnavailableError | ModelRequestError:
        """An SDK error as ShopLens's: unreachable, timeout, 5xx and 429 are "unavailable"
        (retryable); any other 4xx is a rejected request (not retryable)."""
        if isinstance(e, openai.APIStatusError):
            if e.status_code >= 500 or e.status_code == 429:
                return ModelUnavailableError(f"model server answered {e.status_code}: {e.message}",
                                             retry_after_s=_retry_after(e.response))
            param, server_message = _error_detail(e)
            return ModelRequestError(
                f"model server at {self.base_url} rejected the request ({e.status_code}"
                + (f", param {param}" if param else "") + f"): {server_message}",
                status_code=e.status_code, param=param, server_message=server_message)
        return ModelUnavailableError(f"model server unreachable at {self.base_url}: {e}")

    async def aclose(self) -> None:
        await self._client.close()


def _error_detail(e: openai.APIStatusError) -> tuple[str | None, str]:
    """(param, message) from an OpenAI-style error body ``{"error": {"message", "param"}}``
    (vLLM, llama.cpp) or a bare ``{"message": ...}``; falls back to the SDK's message."""
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body)
    if not isinstance(err, dict):
        return None, str(err or e.message)
    param = err.get("param")
    return (str(param) if param else None), str(err.get("message") or e.message)


class _HasHeaders(Protocol):
    """What `_retry_after` reads of a response. The openai SDK's errors carry its own vendored
    client's response type (``httpx2.Response``), not ``httpx.Response``, so only the headers
    mapping is required."""

    @property
    def headers(self) -> Mapping[str, str]: ...


def _retry_after(response: _HasHeaders | None) -> float | None:
    if response is None:
        return None
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
