"""The model for long-running surfaces: loaded in the background, never waited on.

`ModelHolder` starts the runtime's (guarded) model without blocking startup and answers "still
loading" or "failed" at once instead of waiting, so a server answers degraded while the model
loads. `ModelWatch` is one request's view of the model: it remembers whether the model was
unavailable during the request, so a task without a labelled fallback can fail with
`ModelUnavailableError` (the API's 503) instead of answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from agent.domain.errors import ModelUnavailableError
from agent.llm.base import ChatModel, Completion, Message
from agent.llm.wrappers import GuardedModel

if TYPE_CHECKING:
    from agent.app.runtime import Runtime

log = logging.getLogger(__name__)

WATCH_S = 1.0  # how often a ready holder checks that the embedded model server is still running
RESTART_BACKOFF_S = (1.0, 60.0)  # first wait after a failed restart, doubling up to the second

State = Literal["idle", "loading", "ready", "failed", "disabled"]
ModelSource = Callable[[], Awaitable[ChatModel]]


class ModelHolder:
    """Starts the runtime's model in the background and hands it out once it is ready.

    Args:
        runtime: whose `model()` (already guarded) is loaded.
        start: False marks the model disabled (every `get` raises at once).
        retry_after_s: the `retry_after_s` of "loading"/"failed" errors (seconds).
        probe_cache_s: `probe` runs a real completion at most this often (seconds).
        probe_timeout_s: the probe's own bound (seconds), below the guard's per-call deadline so
            a readiness check never hangs as long as a real call may.
    """

    def __init__(self, runtime: Runtime, *, start: bool = True, retry_after_s: float = 5.0,
                 probe_cache_s: float = 5.0, probe_timeout_s: float = 30.0):
        self.runtime = runtime
        self.retry_after_s = retry_after_s
        self.probe_cache_s = probe_cache_s
        self.probe_timeout_s = probe_timeout_s
        self.state: State = "idle" if start else "disabled"
        self.error: str | None = None
        self._failed_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._model: ChatModel | None = None
        self._probe: tuple[float, bool, str] | None = None
        self.tries = 0  # loads started; a failed one is retried on demand after the cool-down
        self.restarts = 0  # times the embedded model server died and was started again
        self.restarting: str | None = None  # why, while a restart is under way
        self._watch_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin loading in the background (no-op while loading, ready or disabled)."""
        if self.state in ("loading", "ready", "disabled"):
            return
        self.state = "loading"
        self.tries += 1
        self._task = asyncio.create_task(self._load(), name="shoplens-model-load")

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            model = await self.runtime.model()
        except Exception as e:  # recorded, logged and reported by readiness; retried on demand
            self.state, self.error, self._failed_at = "failed", f"{type(e).__name__}: {e}", time.monotonic()
            log.error("model failed to start: %s", self.error)
            return
        self._model = model
        self.state, self.error = "ready", None
        log.info("model %s ready after %.1f s", model.model_id, time.perf_counter() - t0)
        self._watch_task = asyncio.create_task(self._watch(), name="shoplens-model-watch")

    async def _watch(self) -> None:
        """Supervise the embedded model server: when it exits (a crash, the OOM killer, kill -9),
        reap it and start it again on the same port, with a doubling wait between failed tries
        (`RESTART_BACKOFF_S`). Meanwhile model calls fail fast (the guard's cool-down) and
        answers are the labelled retrieval-only ones; `restarts` and `restarting` are reported
        by /readyz and /metrics. A remote server (vLLM) is not ours to restart: nothing to watch."""
        while True:
            await asyncio.sleep(WATCH_S)
            code = self.runtime.model_server_exit_code()
            if code is None:
                continue
            self.restarts += 1
            self.restarting = f"the embedded model server exited with code {code}; restart {self.restarts} under way"
            self._probe = None
            log.error("%s", self.restarting)
            wait_s = RESTART_BACKOFF_S[0]
            while True:
                t0 = time.perf_counter()
                try:
                    await self.runtime.restart_model_server()
                    break
                except ModelUnavailableError as e:
                    log.error("model server restart failed (next try in %.0f s): %s", wait_s, e)
                    await asyncio.sleep(wait_s)
                    wait_s = min(2 * wait_s, RESTART_BACKOFF_S[1])
            log.warning("embedded model server restarted in %.1f s (restart %d)", time.perf_counter() - t0,
                        self.restarts)
            self.restarting, self._probe = None, None

    def unavailable(self) -> str | None:
        """Why `get` would raise right now without trying anything, or None (it would hand the
        model out, or start loading it). Pure."""
        if self.restarting is not None:
            return self.restarting
        if self._model is not None:
            return None
        if self.state == "disabled":
            return "the model is not started on this server"
        if self.state == "loading":
            return self._loading()
        if self.state == "failed" and time.monotonic() - self._failed_at < self.runtime.settings.model_cooldown_s:
            return f"the model failed to start ({self.error})"
        return None

    def _loading(self) -> str:
        """'the model is still loading', with the last failure when this is a retry (an
        unreachable server is retried after each cool-down: without it, it reads as loading
        forever)."""
        if self.error is None:
            return "the model is still loading"
        return f"the model is still loading (try {self.tries}; the last one failed: {self.error})"

    async def get(self) -> ChatModel:
        """The guarded model.

        Raises:
            ModelUnavailableError: disabled, still loading, or failed to start (a new start is
                attempted in the background once the guard's cool-down has passed).
        """
        if self._model is not None:
            return self._model
        if self.state == "disabled":
            raise ModelUnavailableError("the model is not started on this server (SHOPLENS_START_MODEL=false)")
        if self.state == "failed" and time.monotonic() - self._failed_at >= self.runtime.settings.model_cooldown_s:
            self.state = "idle"
        if self.state == "idle":
            self.start()
        if self.state == "loading":
            raise ModelUnavailableError(self._loading(), retry_after_s=self.retry_after_s)
        raise ModelUnavailableError(f"the model failed to start ({self.error})", retry_after_s=self.retry_after_s)

    async def probe(self) -> tuple[bool, str]:
        """Whether the model can answer now (cached for `probe_cache_s`): (ok, reason).

        A real 1-token completion when the model is idle. A busy model (every slot taken) is
        never queued behind: a call that succeeded within the guard's deadline proves it answers
        (under load /readyz must not turn 503 and have an orchestrator pull a working instance);
        busy with no success for longer than that, it is not ready.
        """
        now = time.monotonic()
        if self._probe and now - self._probe[0] < self.probe_cache_s:
            return self._probe[1], self._probe[2]
        if self.restarting is not None:
            return False, self.restarting
        try:
            model = await self.get()
            if isinstance(model, GuardedModel) and model.busy():
                ago, bound = now - model.last_ok, model.config.timeout_s
                ok = model.last_ok > 0 and ago <= bound and model.cooling_down() is None
                why = (f"model {model.model_id} busy ({model.slots.in_use} calls running, {model.slots.waiting} "
                       + (f"waiting); its last answer {ago:.0f} s ago" if model.last_ok else "waiting); no answer yet")
                       + ("" if ok else f", none within {bound:g} s"))
            else:
                async with asyncio.timeout(self.probe_timeout_s):
                    comp = await model.complete([{"role": "user", "content": "Say OK."}], max_tokens=1)
                ok, why = True, f"model {model.model_id} answered in {comp.latency_s:.2f} s"
        except TimeoutError:
            ok, why = False, f"the model did not answer a 1-token probe within {self.probe_timeout_s:g} s"
        except ModelUnavailableError as e:
            ok, why = False, str(e)
        self._probe = (time.monotonic(), ok, why)
        return ok, why

    async def aclose(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        if self._task is not None and not self._task.done():
            self._task.cancel()
            # shutting down: the load's result (or its failure) no longer matters
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class ModelWatch:
    """One request's model, remembering whether it was unavailable (and when to retry).

    Args:
        source: where the model comes from (`ModelHolder.get` or `Runtime.model`).
        min_retry_after_s: the least `retry_after_s` to report (a server's Retry-After floor).
    """

    def __init__(self, source: ModelSource, min_retry_after_s: float = 0.0):
        self.source = source
        self.inner: ChatModel | None = None
        self.model_id = "unavailable"
        self.down: str | None = None
        self.retry_after_s = min_retry_after_s

    def _note(self, e: ModelUnavailableError) -> None:
        self.down = self.down or str(e)
        self.retry_after_s = max(self.retry_after_s, e.retry_after_s or 0.0)

    async def get(self) -> ModelWatch:
        """This watch, once the model is available.

        Raises:
            ModelUnavailableError: the source could not give the model (noted).
        """
        try:
            self.inner = await self.source()
        except ModelUnavailableError as e:
            self._note(e)
            raise
        self.model_id = self.inner.model_id
        return self

    async def complete(self, messages: list[Message], **kw: Any) -> Completion:
        if self.inner is None:
            raise ModelUnavailableError("ModelWatch.complete before get()")
        try:
            return await self.inner.complete(messages, **kw)
        except ModelUnavailableError as e:
            self._note(e)
            raise

    def stream(self, messages: list[Message], **kw: Any) -> Any:
        """The inner model's stream (failures during a stream are not noted)."""
        if self.inner is None:
            raise ModelUnavailableError("ModelWatch.stream before get()")
        return self.inner.stream(messages, **kw)
