"""Precompute explained next-item answers in batch, and refresh them when their users change.

* `precompute` (``shoplens precompute``): the served next-item configuration for many users, one
  at a time (or `concurrency` at once), in the model's ``batch`` lane so interactive and
  background calls go first. Each answer is committed to the answer store
  (`agent.app.answers.AnswerStore`) as it is made, so a killed run loses at most the answers in
  flight, and a rerun skips users whose stored answer is still fresh (the same events hash and
  pipeline version, no stale flag). Returns a `PrecomputeReport` (throughput, model calls,
  tokens). `agent.app.precompute_ray.precompute_on_ray` is the same run fanned out over Ray
  and several model replicas; both share `compute_answer`, `store_answer` and `is_fresh`.
* `RefreshWorker`: the API's background task that recomputes users queued by
  ``POST /v1/events`` (`ShopLensService.mark_stale`) or by serving a stale answer.

The API serves stored answers with `ShopLensService.stored_next_item`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field
from tqdm import tqdm

from agent.app.answers import QueuedUser, stale_reason
from agent.app.service import ShopLensService
from agent.domain.errors import CallerError, UnknownUserError
from agent.domain.predictions import NextItemPrediction
from agent.llm.wrappers import lane

log = logging.getLogger(__name__)
MAX_ERRORS = 50  # failed users listed in a report (all are counted)


class PrecomputeError(BaseModel):
    user_id: str
    error: str


class PrecomputeReport(BaseModel):
    """What a precompute run did, and how fast."""

    dataset: str
    k: int
    use_model: bool
    users: int = Field(description="users asked for")
    done: int = Field(default=0, description="answers computed and stored by this run")
    skipped_fresh: int = Field(default=0, description="users whose stored answer was still fresh (resume)")
    failed: int = Field(default=0, description="users with no answer (unknown user, ...); see errors")
    degraded: int = Field(default=0, description="of `done`, answers made without the model they asked for "
                          "(stored flagged stale: the next run or the refresh worker retries them)")
    seconds: float = Field(default=0.0, description="wall time of the run")
    model_calls: int = Field(default=0, description="model calls of the computed answers, repairs included")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: list[PrecomputeError] = Field(default_factory=list, description=f"the first {MAX_ERRORS} failures")
    failures_file: str | None = Field(
        default=None, description="where every failure of this run is written, one JSON object "
        "({user_id, error}) a line, as it happens; the file exists only when a user failed. None: not written")
    replicas: dict[str, int] = Field(default_factory=dict, description="answers computed per model base URL "
                                     "(runs on Ray only, `agent.app.precompute_ray`)")

    @property
    def users_per_hour(self) -> float | None:
        """Computed answers per hour of wall time (skipped users excluded); None before any."""
        return self.done / self.seconds * 3600.0 if self.done and self.seconds > 0 else None

    @property
    def seconds_per_user(self) -> float | None:
        return self.seconds / self.done if self.done else None


@dataclass(frozen=True)
class ComputedAnswer:
    """One user's answer and what it was made from: all `AnswerStore.put` needs, so the process
    that computes it (a Ray actor) need not be the one that stores it.

    Attributes:
        stored_id: the user's stored (pseudonymised when configured) id, the store's key.
        prediction: the answer.
        events_sha256: the user's events hash read before the answer was made.
        version: `ShopLensService.next_item_version` in the process that made it.
    """

    stored_id: str
    prediction: NextItemPrediction
    events_sha256: str
    version: str


async def compute_answer(service: ShopLensService, dataset: str, user_id: str, k: int, *,
                         use_model: bool) -> ComputedAnswer:
    """One user's answer with the served configuration (`ShopLensService.next_item_config`), in
    the model's ``batch`` lane, with the events hash read before it was made (so events arriving
    meanwhile make it stale, never falsely fresh). Stores nothing (`store_answer` does).

    Raises:
        UnknownDatasetError / UnknownUserError: caller mistakes.
    """
    uid = service.stored_id(user_id)
    await service.ensure_indexes(dataset)  # the fusion weights the version names are the ones loaded
    sha = await asyncio.to_thread(service.runtime.store.user_events_sha256, dataset, uid)
    if sha is None:
        raise UnknownUserError(dataset, user_id)
    version = service.next_item_version(dataset, k=k, use_model=use_model)
    cfg = service.next_item_config(k=k, use_model=use_model)
    with lane("batch"):
        pred = await service.next_item(dataset, user_id, config=cfg, use_model=use_model)
    return ComputedAnswer(uid, pred, sha, version)


def store_answer(service: ShopLensService, dataset: str, answer: ComputedAnswer, *, use_model: bool) -> None:
    """Commit `answer` to the answer store (blocking SQLite write); an answer that wanted the model
    and was made without it is stored flagged stale."""
    service.runtime.answers.put(dataset, answer.stored_id, answer.prediction, use_model=use_model,
                                events_sha256=answer.events_sha256, version=answer.version,
                                stale=use_model and answer.prediction.meta.degraded)


async def compute_and_store(service: ShopLensService, dataset: str, user_id: str, k: int, *,
                            use_model: bool) -> NextItemPrediction:
    """`compute_answer`, then `store_answer`: committed before this returns.

    Raises:
        UnknownDatasetError / UnknownUserError: caller mistakes (nothing is stored).
    """
    answer = await compute_answer(service, dataset, user_id, k, use_model=use_model)
    await asyncio.to_thread(store_answer, service, dataset, answer, use_model=use_model)
    return answer.prediction


def count_done(report: PrecomputeReport, pred: NextItemPrediction) -> None:
    """Add one computed and stored answer to `report` (its model calls and tokens)."""
    m = pred.meta
    report.done += 1
    report.degraded += int(report.use_model and m.degraded)
    report.model_calls += m.attempts
    report.prompt_tokens += m.prompt_tokens
    report.completion_tokens += m.completion_tokens


def count_failed(report: PrecomputeReport, user_id: str, error: str) -> None:
    """Add one user with no answer to `report`; the first `MAX_ERRORS` are listed, and every one
    is appended to `report.failures_file` when it is set (flushed at once, so a run that is
    stopped keeps the record of what failed before)."""
    report.failed += 1
    if len(report.errors) < MAX_ERRORS:
        report.errors.append(PrecomputeError(user_id=user_id, error=error))
    if report.failures_file is not None:
        with open(report.failures_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"user_id": user_id, "error": error}) + "\n")


def failures_path(workspace: Path, dataset: str, k: int) -> Path:
    """The default failures file of a precompute run: ``<workspace>/precompute/<dataset>.k<k>.failed.jsonl``."""
    return workspace / "precompute" / f"{dataset}.k{k}.failed.jsonl"


def start_report(dataset: str, k: int, use_model: bool, users: int, failures: Path | None) -> PrecomputeReport:
    """An empty report for a run; with `failures`, the previous run's file there is removed (it
    would name users this run may answer) and its folder made."""
    if failures is not None:
        failures.parent.mkdir(parents=True, exist_ok=True)
        failures.unlink(missing_ok=True)
    return PrecomputeReport(dataset=dataset, k=k, use_model=use_model, users=users,
                            failures_file=str(failures) if failures is not None else None)


async def precompute(service: ShopLensService, dataset: str, users: Sequence[str], k: int = 5, *,
                     use_model: bool = True, resume: bool = True, progress: bool = True,
                     concurrency: int = 1, failures: Path | None = None) -> PrecomputeReport:
    """Compute and store next-item answers for `users` (caller or stored ids) with the served
    configuration, in the model's ``batch`` lane, with a progress bar (tqdm, stderr).

    Args:
        resume: skip users whose stored answer for this k is fresh (a rerun after a kill or a
            crash computes only the rest); False recomputes everyone.
        concurrency: users in flight at once. 1 on a CPU model server (calls queue behind one
            another anyway); more for a server that batches requests (vLLM), bounded again by the
            model guard's concurrency cap.
        failures: a file to write every failed user to, one JSON object a line (see
            `PrecomputeReport.failures_file`; e.g. `failures_path`); None: none written.

    Returns:
        The run's report. A user that cannot be answered is counted in `failed`, listed in
        `errors` and written to `failures`; the run goes on.

    Raises:
        UnknownDatasetError / RequestError: the dataset was never ingested or cannot be indexed.
        asyncio.CancelledError, KeyboardInterrupt: the run was stopped; every answer stored so
            far is kept.
    """
    await service.ensure_indexes(dataset)
    report = start_report(dataset, k, use_model, len(users), failures)
    t0 = time.perf_counter()
    todo = iter(users)
    bar = tqdm(total=len(users), unit="user", desc=f"precompute {dataset}", disable=not progress)

    async def one(user_id: str) -> None:
        if resume and await asyncio.to_thread(is_fresh, service, dataset, user_id, k, use_model):
            report.skipped_fresh += 1
            return
        try:
            pred = await compute_and_store(service, dataset, user_id, k, use_model=use_model)
        except Exception as e:  # noqa: BLE001 - one user's failure is reported, the run goes on
            if not isinstance(e, CallerError):
                log.error("precompute: user %r failed", user_id, exc_info=e)
            count_failed(report, user_id, f"{type(e).__name__}: {e}")
            return
        count_done(report, pred)

    async def worker() -> None:
        for user_id in todo:  # shared iterator: each user is taken by one worker
            await one(user_id)
            bar.update(1)
            bar.set_postfix(done=report.done, fresh=report.skipped_fresh, failed=report.failed, refresh=False)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, concurrency)):
                tg.create_task(worker())
    finally:
        bar.close()
        report.seconds = round(time.perf_counter() - t0, 3)
    return report


def is_fresh(service: ShopLensService, dataset: str, user_id: str, k: int, use_model: bool) -> bool:
    """Whether `user_id` (caller or stored id) has a stored answer for this k that is still fresh:
    the same events hash and pipeline version as now, no stale flag (blocking SQLite reads)."""
    uid = service.stored_id(user_id)
    entry = service.runtime.answers.get(dataset, uid, k)
    if entry is None:
        return False
    sha = service.runtime.store.user_events_sha256(dataset, uid)
    return sha is not None and stale_reason(entry, sha, service.next_item_version(dataset, k=k,
                                                                                 use_model=use_model)) is None


class RefreshWorker:
    """Recomputes the stored answers of queued users (new events, or a stale answer served), in
    the model's ``batch`` lane: one user at a time, oldest mark first.

    Why a small asyncio task and not a task queue such as huey: huey's consumer is a separate
    process, so it would need its own model server (or a client outside the API's model guard,
    its concurrency cap and its lanes) and its own copy of the FAISS indexes and caches, loaded
    again. This worker runs in the API's event loop, shares the loaded indexes, and its model
    calls wait behind every interactive and background call. The queue is a table beside the
    answers (`AnswerStore.next_due`), so it survives a restart and needs no broker; a refresh
    stopped by a shutdown stays queued. The cost: refreshes run only while an API process runs.

    Args:
        service: the facade to compute with (its deadline bounds each answer).
        poll_s: seconds between looks at an empty queue (a refresh starts at most this long
            after the events arrive).
        retry_s: seconds before a user whose refresh could not reach the model is tried again.
        max_attempts: tries before such a user leaves the queue (its answer stays, flagged stale,
            and is queued again when it is next served or its user gets events).
    """

    def __init__(self, service: ShopLensService, *, poll_s: float = 2.0, retry_s: float = 30.0,
                 max_attempts: int = 5):
        self.service = service
        self.poll_s, self.retry_s, self.max_attempts = poll_s, retry_s, max_attempts
        self.refreshed = 0  # answers recomputed
        self.unchanged = 0  # answers found fresh after all (their flag cleared)
        self._task: asyncio.Task[None] | None = None

    async def run_once(self, limit: int | None = None) -> int:
        """Refresh queued users whose time has come until none is left (or `limit` users).

        Returns:
            How many queued users were handled (refreshed, found unchanged, or put back to retry).
        """
        answers = self.service.runtime.answers
        n = 0
        while limit is None or n < limit:
            item = await asyncio.to_thread(answers.next_due)
            if item is None:
                break
            await self.refresh(item)
            n += 1
        return n

    async def refresh(self, item: QueuedUser) -> None:
        """Recompute one queued user's stored answers that are stale; clear the flag of those that
        are not; remove the user from the queue, or put it back to retry when the model could not
        be reached."""
        svc, answers = self.service, self.service.runtime.answers
        ok = True
        try:
            entries = await asyncio.to_thread(answers.entries, item.dataset, item.user_id)
            sha = await asyncio.to_thread(svc.runtime.store.user_events_sha256, item.dataset, item.user_id)
            if sha is None:  # the user was deleted: nothing to refresh, nothing to keep
                await asyncio.to_thread(answers.forget_user, item.dataset, [item.user_id])
                entries = []
            for e in entries:
                version = svc.next_item_version(item.dataset, k=e.k, use_model=e.use_model)
                if e.events_sha256 == sha and e.pipeline_version == version and not (
                        e.use_model and e.prediction.meta.degraded):
                    await asyncio.to_thread(answers.clear_stale, item.dataset, item.user_id, e.k)
                    self.unchanged += 1
                    continue
                pred = await compute_and_store(svc, item.dataset, item.user_id, e.k, use_model=e.use_model)
                self.refreshed += 1
                ok = ok and not (e.use_model and pred.meta.degraded)
        except CallerError as e:  # the dataset or user is gone: nothing to retry
            log.info("refresh of %s/%s dropped: %s", item.dataset, item.user_id, e)
        except Exception:  # noqa: BLE001 - logged; the user is retried, then dropped
            log.exception("refresh of %s/%s failed", item.dataset, item.user_id)
            ok = False
        if ok:
            await asyncio.to_thread(answers.done, item)
        elif not await asyncio.to_thread(answers.retry_later, item, self.retry_s, self.max_attempts):
            log.warning("refresh of %s/%s gave up after %d attempts; its answer stays flagged stale",
                        item.dataset, item.user_id, self.max_attempts)

    def start(self) -> None:
        """Start polling the queue in the background (in the running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="shoplens-refresh-worker")

    async def stop(self) -> None:
        """Stop polling; a refresh in flight is cancelled and stays queued."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            try:
                n = await self.run_once()
            except Exception:  # noqa: BLE001 - the store was unreadable this time; try again later
                log.exception("refresh worker: could not read the queue")
                n = 0
            if n == 0:
                await asyncio.sleep(self.poll_s)
