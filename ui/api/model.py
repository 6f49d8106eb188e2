"""The model as the API uses it: loaded in the background, guarded on every call.

`ModelHolder` starts the model (the embedded server, or a connection to
``SHOPLENS_LLM_BASE_URL``) without blocking startup and answers "still loading" or "failed"
at once instead of waiting. Each call goes through the shared guard
(`agent.llm.wrappers.GuardedModel`: deadline, tenacity retry, priority lanes, cool-down), with
the API's metrics as its observer. Both raise `ModelUnavailableError`, which the service turns
into degraded answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Literal

from agent.app.runtime import Runtime
from agent.llm.base import ChatModel, ModelUnavailableError, Usage
from agent.llm.wrappers import GuardConfig, GuardedModel, Lane
from ui.api.config import ApiSettings
from ui.api.metrics import Metrics

log = logging.getLogger("shoplens.api.model")

State = Literal["idle", "loading", "ready", "failed", "disabled"]


class MetricsObserver:
    """Feeds the shared guard's call events into the API's Prometheus metrics."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def call_started(self, lane: Lane) -> None:
        self.metrics.model_in_flight.inc()

    def call_finished(self, lane: Lane, outcome: str, seconds: float, usage: Usage | None) -> None:
        self.metrics.model_in_flight.dec()
        self.metrics.model_latency.labels(outcome).observe(seconds)
        if usage is not None:
            self.metrics.model_tokens.labels("prompt").inc(usage.prompt_tokens)
            self.metrics.model_tokens.labels("completion").inc(usage.completion_tokens)


def guard_config(settings: ApiSettings) -> GuardConfig:
    """The API's bounds for the shared guard."""
    return GuardConfig(timeout_s=settings.model_call_timeout_s, retries=settings.model_retries,
                       max_concurrency=settings.model_max_concurrency, cooldown_s=settings.model_cooldown_s)


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
        self._model = GuardedModel(inner, guard_config(self.settings), MetricsObserver(self.metrics))
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
