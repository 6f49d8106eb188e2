"""The timeout-and-degrade policy every task call goes through (the same for every surface).

One task call gets the model through a `ModelWatch` and runs within the request deadline
(`Settings.request_timeout_s`):

* the model is unavailable (disabled, loading, failing): the task answers without it, labelled
  `meta.degraded=true` with the reason;
* the deadline passes: the task's labelled fallback answers, with "model did not answer within
  N s" in the reason;
* a task whose answer IS the model's work (`needs_model`, e.g. the profile summary when the
  caller wants it strictly) raises `ModelUnavailableError` instead, with when to retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from agent.app.model_holder import ModelSource, ModelWatch
from agent.domain.errors import ModelUnavailableError
from agent.domain.predictions import Meta
from agent.llm.base import ChatModel

log = logging.getLogger(__name__)


class HasMeta(Protocol):
    meta: Meta


P = TypeVar("P", bound=HasMeta)
Run = Callable[[ChatModel | None, str | None], Awaitable[P]]


def mark_unavailable(pred: P, why: str | None, notes: list[str] | None = None) -> P:
    """Add service notes, and mark the answer degraded when the model was wanted but missing
    (`why` says why; None when the model answered or the caller did not want it)."""
    pred.meta.notes.extend(notes or [])
    if why:
        pred.meta.degraded = True
        pred.meta.degraded_reason = f"model unavailable ({why}); " + (pred.meta.degraded_reason or "")
    return pred


async def model_for(watch: ModelWatch, use_model: bool) -> tuple[ChatModel | None, str | None]:
    """(the watched model, None), or (None, why) when it cannot be had; (None, None) when the
    caller does not want it."""
    if not use_model:
        return None, None
    try:
        return await watch.get(), None
    except ModelUnavailableError as e:
        log.warning("model unavailable: %s", e)
        return None, str(e)


def model_down(watch: ModelWatch, needs: str, hint: str) -> ModelUnavailableError:
    return ModelUnavailableError(f"{watch.down}; {needs} needs it. {hint}".strip(),
                                 retry_after_s=watch.retry_after_s or None)


async def run_task(source: ModelSource, run: Run[P], *, use_model: bool, deadline_s: float,
                   fallback: Callable[[], Awaitable[P]] | None, needs_model: str | None = None,
                   hint: str = "", min_retry_after_s: float = 0.0) -> P:
    """Run one task call under the policy above.

    Args:
        source: where the model comes from.
        run: the task, given (model or None, why it is None when the model was wanted).
        use_model: False answers without the model (not marked degraded by this policy).
        deadline_s: the whole call's deadline in seconds.
        fallback: the labelled answer without the model, used when the deadline passes; None for
            a task that has none (then `ModelUnavailableError`).
        needs_model: the task's model-only part, named in the error (e.g. "the profile summary");
            when given, a model that was unavailable during the call raises instead of degrading.
        hint: what the caller can do instead, appended to the error.
        min_retry_after_s: the least `retry_after_s` the error reports.

    Raises:
        ModelUnavailableError: the model was unavailable or too slow and the task cannot answer
            without it (see `fallback` and `needs_model`).
    """
    watch = ModelWatch(source, min_retry_after_s)
    try:
        async with asyncio.timeout(deadline_s):
            model, why = await model_for(watch, use_model)
            pred = await run(model, why)
    except TimeoutError:
        if fallback is None or needs_model:
            watch.down = watch.down or f"no answer within {deadline_s:g} s"
            raise model_down(watch, needs_model or "this task", hint) from None
        pred = await fallback()
        pred.meta.degraded = True
        pred.meta.degraded_reason = (f"model did not answer within {deadline_s:g} s; "
                                     + (pred.meta.degraded_reason or ""))
    if watch.down and use_model and needs_model:
        raise model_down(watch, needs_model, hint)
    return pred
