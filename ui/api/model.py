"""The model as the API uses it: loaded in the background, guarded on every call.

`ModelHolder` starts the model (the embedded server, or a connection to
``SHOPLENS_LLM_BASE_URL``) without blocking startup and answers "still loading" or "failed"
at once instead of waiting. `GuardedModel` wraps each call with a concurrency cap
(`asyncio.Semaphore`), a deadline that covers queueing and retries, a bounded retry for
"unavailable" failures, and a cool-down after a failure so a dead server is not hammered.
Both raise `ModelUnavailableError`, which the service turns into degraded answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal

from agent.app.runtime import Runtime
from agent.llm.base import ChatModel, Completion, Message, ModelUnavailableError
from ui.api.config import ApiSettings
from ui.api.metrics import Metrics

log = logging.getLogger("shoplens.api.model")

State = Literal["idle", "loading", "ready", "failed", "disabled"]


class GuardedModel:
    """A `ChatModel` with a timeout, bounded retry, concurrency cap and failure cool-down."""

    def __init__(self, inner: ChatModel, settings: ApiSettings, metrics: Metrics):
        self.inner = inner
        self.model_id = inner.model_id
        self.timeout_s = settings.model_call_timeout_s
        self.retries = settings.model_retries
        self.cooldown_s = settings.model_cooldown_s
        self._sem = asyncio.Semaphore(settings.model_max_concurrency)
        self._metrics = metrics
        self.down_until = 0.0
        self.last_error: str | None = None

    async def complete(
        self,
        messages: list[Message],
        *,
        schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        """As `ChatModel.complete`, bounded by `model_call_timeout_s` in all (queue included).

        Raises:
            ModelUnavailableError: cooling down after a failure, timed out, or every attempt
                failed; `retry_after_s` says when to try again.
        """
        now = time.monotonic()
        if now < self.down_until:
            raise ModelUnavailableError(
                f"model failing ({self.last_error}); not retried for {self.down_until - now:.1f} s",
                retry_after_s=self.down_until - now,
            )
        t0 = time.perf_counter()
        outcome = "error"
        self._metrics.model_in_flight.inc()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._sem:
                    comp = await self._attempts(messages, schema=schema, max_tokens=max_tokens,
                                                temperature=temperature, top_logprobs=top_logprobs)
            outcome = "ok"
            self.down_until, self.last_error = 0.0, None
            self._metrics.model_tokens.labels("prompt").inc(comp.usage.prompt_tokens)
            self._metrics.model_tokens.labels("completion").inc(comp.usage.completion_tokens)
            return comp
        except TimeoutError as e:
            outcome = "timeout"
            self._fail(f"no answer within {self.timeout_s:g} s")
            raise ModelUnavailableError(f"model call timed out after {self.timeout_s:g} s",
                                        retry_after_s=self.cooldown_s) from e
        except ModelUnavailableError as e:
            self._fail(str(e))
            raise
        except Exception as e:  # e.g. a 4xx from the server: logged, then answered degraded
            log.exception("model call failed")
            self._fail(f"{type(e).__name__}: {e}")
            raise ModelUnavailableError(f"model call failed: {type(e).__name__}: {e}") from e
        finally:
            self._metrics.model_in_flight.dec()
            self._metrics.model_latency.labels(outcome).observe(time.perf_counter() - t0)

    async def _attempts(self, messages: list[Message], **kw: Any) -> Completion:
        for attempt in range(self.retries + 1):
            try:
                return await self.inner.complete(messages, **kw)
            except ModelUnavailableError as e:
                if attempt == self.retries:
                    raise ModelUnavailableError(str(e), attempts=attempt + 1,
                                                retry_after_s=e.retry_after_s) from e
                log.warning("model call failed (attempt %d), retrying: %s", attempt + 1, e)
                await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        self.down_until = time.monotonic() + self.cooldown_s


class ModelHolder:
    """Starts the model in the background and hands out the guarded model once it is ready."""

    def __init__(self, runtime: Runtime, settings: ApiSettings, metrics: Metrics):
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.state: State = "idle" if settings.start_model else "disabled"
        self.error: str | None = None
        self._failed_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._model: GuardedModel | None = None
        self._probe: tuple[float, bool, str] | None = None

    def start(self) -> None:
        """Begin loading in the background (no-op while loading, ready or disabled)."""
        if self.state in ("loading", "ready", "disabled"):
            return
        self.state = "loading"
        self._task = asyncio.create_task(self._load(), name="shoplens-model-load")

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            inner = await self.runtime.model()
        except Exception as e:  # recorded, logged and reported by /readyz; retried on demand
            self.state, self.error, self._failed_at = "failed", f"{type(e).__name__}: {e}", time.monotonic()
            log.error("model failed to start: %s", self.error)
            return
        self._model = GuardedModel(inner, self.settings, self.metrics)
        self.state, self.error = "ready", None
        log.info("model %s ready after %.1f s", inner.model_id, time.perf_counter() - t0)

    async def get(self) -> ChatModel:
        """The guarded model.

        Raises:
            ModelUnavailableError: disabled, still loading, or failed to start (a new start is
                attempted in the background once the cool-down has passed).
        """
        if self._model is not None:
            return self._model
        retry = float(self.settings.retry_after_s)
        if self.state == "disabled":
            raise ModelUnavailableError("the model is not started on this server (SHOPLENS_START_MODEL=false)")
        if self.state == "failed" and time.monotonic() - self._failed_at >= self.settings.model_cooldown_s:
            self.state = "idle"
        if self.state == "idle":
            self.start()
        if self.state == "loading":
            raise ModelUnavailableError("the model is still loading", retry_after_s=retry)
        raise ModelUnavailableError(f"the model failed to start ({self.error})", retry_after_s=retry)

    async def probe(self) -> tuple[bool, str]:
        """A real 1-token completion (cached for `readyz_cache_s`): (ok, reason)."""
        now = time.monotonic()
        if self._probe and now - self._probe[0] < self.settings.readyz_cache_s:
            return self._probe[1], self._probe[2]
        try:
            model = await self.get()
            comp = await model.complete([{"role": "user", "content": "Say OK."}], max_tokens=1)
            ok, why = True, f"model {model.model_id} answered in {comp.latency_s:.2f} s"
        except ModelUnavailableError as e:
            ok, why = False, str(e)
        self._probe = (time.monotonic(), ok, why)
        return ok, why

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            # shutting down: the load's result (or its failure) no longer matters
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
