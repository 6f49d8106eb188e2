"""Model wrappers every surface shares (API, chat, CLI, eval): the guard and its lanes.

`GuardedModel` wraps any `ChatModel` with

* a deadline per call that covers the wait for a slot, the call and its retries;
* a bounded retry of "unavailable" failures (tenacity: exponential back-off, capped attempts);
  a rejected request (`ModelRequestError`) is never retried;
* a concurrency cap with priority lanes: ``interactive`` before ``background`` before
  ``batch``. The lane of a call is read from a context variable (`lane`), so a caller marks a
  whole task (``with lane("background"): ...``) without threading a parameter through every
  task signature. A cancelled or timed-out call releases its slot at once;
* admission ("model busy", no cool-down): with every slot taken, a call that could not finish
  within its deadline (by a moving average of call times and the calls ahead of it) is refused
  at once instead of queued, and ``background`` work is never queued; a call whose deadline
  passes while it waits for a slot is "busy" too, not a failure. (The average counts a stream's
  whole time in its slot, its consumer's pace included: an overestimate, so it errs to refusing.);
* a cool-down after a call failed every retry, so a dead server is not hammered;
* an observer (`ModelObserver`) told of every call, so the API's Prometheus metrics and the
  CLI's counters come from the same place.

Errors: every failure that is not a `ModelRequestError` leaves as `ModelUnavailableError`
(with `retry_after_s`), which the tasks turn into labelled degraded answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from agent.domain.errors import ModelRequestError, ModelUnavailableError
from agent.llm.base import ChatModel, Completion, Message, Usage

log = logging.getLogger(__name__)

Lane = Literal["interactive", "background", "batch"]
LANE_PRIORITY: dict[Lane, int] = {"interactive": 0, "background": 1, "batch": 2}
_current_lane: ContextVar[Lane] = ContextVar("shoplens_model_lane", default="interactive")


@contextlib.contextmanager
def lane(name: Lane) -> Iterator[None]:
    """Run the model calls made inside this block in lane `name` (default ``interactive``).

    Raises:
        ValueError: unknown lane name.
    """
    if name not in LANE_PRIORITY:
        raise ValueError(f"unknown lane {name!r}; use one of {', '.join(LANE_PRIORITY)}")
    token = _current_lane.set(name)
    try:
        yield
    finally:
        _current_lane.reset(token)


def current_lane() -> Lane:
    """The lane model calls made now would run in."""
    return _current_lane.get()


class ModelObserver(Protocol):
    """Told about every guarded call (the API's metrics implement it)."""

    def call_started(self, lane: Lane) -> None: ...

    def call_finished(self, lane: Lane, outcome: str, seconds: float, usage: Usage | None) -> None: ...


class NullObserver:
    """Counts calls and tokens in memory (the CLI's and eval's observer)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.usage = Usage()

    def call_started(self, lane: Lane) -> None:
        return None

    def call_finished(self, lane: Lane, outcome: str, seconds: float, usage: Usage | None) -> None:
        self.calls[outcome] = self.calls.get(outcome, 0) + 1
        if usage is not None:
            self.usage.add(usage)


class PrioritySlots:
    """A counting semaphore that wakes waiters by lane priority, then arrival order.

    Unlike `asyncio.Semaphore`, a later interactive call overtakes queued batch calls. A waiter
    that is cancelled (its deadline passed, its client went away) leaves the queue and never
    takes a slot.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.in_use = 0
        self._queue: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._queue if not f.done())

    def ahead(self, priority: int) -> int:
        """Waiters a new call of `priority` would queue behind (same or more urgent lanes)."""
        return sum(1 for p, _, f in self._queue if not f.done() and p <= priority)

    async def acquire(self, priority: int) -> None:
        if self.in_use < self.capacity and not self.waiting:
            self.in_use += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled: hand it on
                self.release()
            raise

    def release(self) -> None:
        while self._queue:
            _, _, fut = heapq.heappop(self._queue)
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the best waiter
                return
        self.in_use -= 1

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()


# Weight of the newest call in the moving average of call times that admission estimates use.
CALL_TIME_WEIGHT = 0.3


@dataclass(frozen=True)
class GuardConfig:
    """How the guard bounds model calls (from `Settings`; see its comments for the defaults).

    Attributes:
        timeout_s: one call's deadline in seconds, the wait for a slot and retries included.
        retries: extra attempts after an "unavailable" failure (0 = no retry).
        max_concurrency: calls in the model at once.
        cooldown_s: after a call failed every attempt, fail fast for this long.
        max_tokens_cap: the most tokens any call may generate (a runaway whitespace run under a
            grammar cannot hold a slot for long).
    """

    timeout_s: float = 120.0
    retries: int = 1
    max_concurrency: int = 2
    cooldown_s: float = 5.0
    max_tokens_cap: int = 1024


class GuardedModel:
    """A `ChatModel` with a deadline, bounded retry, priority lanes and a failure cool-down.

    Args:
        inner: the model to guard (an adapter or a fake).
        config: the bounds.
        observer: told of every call (default: in-memory counters).
    """

    def __init__(self, inner: ChatModel, config: GuardConfig | None = None,
                 observer: ModelObserver | None = None):
        self.inner = inner
        self.config = config or GuardConfig()
        self.model_id = inner.model_id
        self.observer: ModelObserver = observer or NullObserver()
        self.slots = PrioritySlots(self.config.max_concurrency)
        self.down_until = 0.0
        self.last_error: str | None = None
        self.last_ok = 0.0  # time.monotonic() of the last call that succeeded (0: none yet)
        self.call_s: float | None = None  # moving average of a successful call's time in its slot (s)

    def cooling_down(self) -> str | None:
        """Why calls are refused right now (after a failure, for `GuardConfig.cooldown_s`), or
        None when a call would be tried. Pure: no call, no I/O."""
        left = self.down_until - time.monotonic()
        return f"model failing ({self.last_error}); retried in {left:.1f} s" if left > 0 else None

    def _check_cooldown(self) -> None:
        now = time.monotonic()
        if now < self.down_until:
            raise ModelUnavailableError(
                f"model failing ({self.last_error}); not retried for {self.down_until - now:.1f} s",
                retry_after_s=self.down_until - now,
            )

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        self.down_until = time.monotonic() + self.config.cooldown_s

    def _ok(self, in_slot_s: float) -> None:
        self.down_until, self.last_error, self.last_ok = 0.0, None, time.monotonic()
        a = CALL_TIME_WEIGHT
        self.call_s = in_slot_s if self.call_s is None else (1 - a) * self.call_s + a * in_slot_s

    def _admit(self, priority: int) -> None:
        """Refuse at once a call that could not finish within the deadline: with every slot taken
        and `n` calls ahead of it, it would wait about n / slots x `call_s` plus half a call for a
        slot, then run `call_s` itself. Queueing it anyway is how a queue collapses under load
        (each waiter times out just as its turn comes, so no call succeeds). Labelled "model
        busy"; no cool-down starts.

        The background lane (refinements nobody waits on) is never queued: with every slot taken
        it is refused at once, so under load the model's time goes to callers who wait.

        Raises:
            ModelUnavailableError: the estimate is over `GuardConfig.timeout_s`, or a background
                call found every slot taken.
        """
        if not self.busy():
            return
        if priority == LANE_PRIORITY["background"]:
            raise ModelUnavailableError(
                f"model busy: {self.slots.in_use} calls running; background work is not queued",
                retry_after_s=self.call_s / 2 if self.call_s else self.config.cooldown_s)
        if self.call_s is None:
            return
        ahead = self.slots.ahead(priority)
        estimate = ahead / self.slots.capacity * self.call_s + self.call_s / 2 + self.call_s
        if estimate > self.config.timeout_s:
            raise ModelUnavailableError(
                f"model busy: {self.slots.in_use} calls running and {ahead} waiting ahead at about "
                f"{self.call_s:.0f} s a call; this one would not finish within {self.config.timeout_s:g} s",
                retry_after_s=self.call_s / 2)

    def busy(self) -> bool:
        """Every slot is taken: a new call would queue. Pure."""
        return self.slots.in_use >= self.slots.capacity

    def _no_slot(self) -> ModelUnavailableError:
        """The deadline passed while the call waited for a slot: the model is busy, not failing,
        so no cool-down starts (other calls and readiness are not refused for it)."""
        return ModelUnavailableError(
            f"model busy: no free slot within {self.config.timeout_s:g} s ({self.slots.in_use} calls running, "
            f"{self.slots.waiting} waiting)", retry_after_s=self.config.cooldown_s)

    async def complete(
        self,
        messages: list[Message],
        *,
        schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        """As `ChatModel.complete`, bounded by `GuardConfig.timeout_s` in all (queue included).

        Raises:
            ModelUnavailableError: cooling down after a failure, timed out, or every attempt
                failed; `retry_after_s` says when to try again.
            ModelRequestError: the server rejected the request (not retried).
        """
        self._check_cooldown()
        which = current_lane()
        t0 = time.perf_counter()
        outcome, usage = "error", None
        self.observer.call_started(which)
        kw = dict(schema=schema, max_tokens=min(max_tokens, self.config.max_tokens_cap),
                  temperature=temperature, top_logprobs=top_logprobs)
        got_slot, in_slot = False, 0.0
        try:
            try:
                self._admit(LANE_PRIORITY[which])
            except ModelUnavailableError:
                outcome = "busy"
                raise
            async with asyncio.timeout(self.config.timeout_s):
                async with self.slots.slot(LANE_PRIORITY[which]):
                    got_slot, in_slot = True, time.perf_counter()
                    comp = await self._attempts(messages, kw)
            outcome, usage = "ok", comp.usage
            self._ok(time.perf_counter() - in_slot)
            return comp
        except TimeoutError as e:
            if not got_slot:
                outcome = "busy"
                raise self._no_slot() from e
            outcome = "timeout"
            self._fail(f"no answer within {self.config.timeout_s:g} s")
            raise ModelUnavailableError(f"model call timed out after {self.config.timeout_s:g} s",
                                        retry_after_s=self.config.cooldown_s) from e
        except ModelRequestError:
            outcome = "rejected"
            raise
        except ModelUnavailableError as e:
            if outcome != "busy":  # refused before queueing: the model is busy, not failing
                self._fail(str(e))
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:  # an adapter bug or an unexpected SDK error: named, then degraded
            log.exception("model call failed")
            self._fail(f"{type(e).__name__}: {e}")
            raise ModelUnavailableError(f"model call failed: {type(e).__name__}: {e}") from e
        finally:
            self.observer.call_finished(which, outcome, time.perf_counter() - t0, usage)

    async def _attempts(self, messages: list[Message], kw: dict[str, Any]) -> Completion:
        attempts = self.config.retries + 1
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(attempts),
                wait=wait_exponential(multiplier=0.25, max=2.0),
                retry=retry_if_exception_type(ModelUnavailableError),
                reraise=False,
                before_sleep=lambda rs: log.warning("model call failed (attempt %d), retrying: %s",
                                                    rs.attempt_number, rs.outcome.exception() if rs.outcome else ""),
            ):
                with attempt:
                    return await self.inner.complete(messages, **kw)
        except RetryError as e:
            last = e.last_attempt.exception()
            retry_after = getattr(last, "retry_after_s", None)
            raise ModelUnavailableError(str(last), attempts=attempts, retry_after_s=retry_after) from last
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def stream(
        self, messages: list[Message], *, max_tokens: int = 512, temperature: float = 0.0,
    ) -> AsyncIterator[str]:
        """As `ChatModel.stream`, holding one slot of the caller's lane until the stream ends
        (or the consumer stops, which releases it). The deadline covers the wait for the slot
        and each gap between chunks; the first failure before any chunk is retried once.

        Raises:
            ModelUnavailableError: cooling down, timed out, or the server failed.
        """
        self._check_cooldown()
        which = current_lane()
        t0 = time.perf_counter()
        outcome = "error"
        self.observer.call_started(which)
        try:
            try:
                self._admit(LANE_PRIORITY[which])
                async with asyncio.timeout(self.config.timeout_s):
                    await self.slots.acquire(LANE_PRIORITY[which])
            except TimeoutError as e:
                outcome = "busy"
                raise self._no_slot() from e
            except ModelUnavailableError:
                outcome = "busy"
                raise
            in_slot = time.perf_counter()
            try:
                it = self.inner.stream(messages, max_tokens=min(max_tokens, self.config.max_tokens_cap),
                                       temperature=temperature)
                while True:
                    try:
                        async with asyncio.timeout(self.config.timeout_s):
                            chunk = await anext(it)
                    except StopAsyncIteration:
                        break
                    yield chunk
                outcome = "ok"
                self._ok(time.perf_counter() - in_slot)
            finally:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(RuntimeError):
                        await aclose()
                self.slots.release()
        except TimeoutError as e:
            outcome = "timeout"
            self._fail(f"stream stalled for {self.config.timeout_s:g} s")
            raise ModelUnavailableError(f"model stream stalled for {self.config.timeout_s:g} s",
                                        retry_after_s=self.config.cooldown_s) from e
        except ModelUnavailableError as e:
            if outcome != "busy":  # a wait for a slot is no failure of the model
                self._fail(str(e))
            raise
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            self.observer.call_finished(which, outcome, time.perf_counter() - t0, None)
