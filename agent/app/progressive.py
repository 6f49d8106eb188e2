"""Progressive next-item answers: the fast ranking at once, the model's refinement after it.

A progressive request answers in milliseconds with the served pipeline without the model
(retrieval + trained sources + learned fusion: stage ``fast``) and starts one background job that
runs the same pipeline with the model: the LLM-scored ranking (stage ``refined``, reasons still
the labelled templates) and then the model's reasons (stage ``explained``). The caller waits up
to a bound, polls the job by its recommendation id, or follows it as Server-Sent Events.

Jobs live in memory, per runtime (`ProgressiveJobs`): bounded in number (the oldest finished job
is dropped first; when `max_running` jobs are refining, a new request gets the fast answer with
the refinement ``skipped`` and the reason) and in age (`ttl_s`). A process restart loses running
refinements, never an answer already returned; precomputed answers are in SQLite instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from agent.domain.errors import UnknownRecommendationError
from agent.domain.predictions import NextItemPrediction

Stage = Literal["fast", "refined", "explained"]
JobState = Literal["running", "done", "failed", "skipped"]
STAGES: tuple[Stage, ...] = ("fast", "refined", "explained")


class Refinement(BaseModel):
    """Where the model's refinement of a progressive answer stands."""

    state: JobState = Field(description="running: the model is working; done: the answer below is "
                            "final; failed: the model could not refine it (see error), the answer "
                            "below stays; skipped: no refinement was started (see error)")
    stage: Stage = Field(description="what the answer below is: fast (no model), refined "
                         "(LLM-scored ranking, template reasons), explained (model reasons)")
    stages_done: list[Stage] = Field(description="the stages reached so far, in order")
    started_at: float = Field(description="unix seconds")
    updated_at: float = Field(description="unix seconds")
    elapsed_s: float = Field(description="seconds from the request to the last update")
    error: str | None = None


class NextItemAnswer(NextItemPrediction):
    """A next-item answer as the API, the CLI and the chat serve it: the prediction, the id to send
    feedback and polls with, and where the model's refinement stands."""

    recommendation_id: str = Field(description="send it back with feedback (POST /v1/feedback) and "
                                   "to poll (GET /v1/next-item/{recommendation_id})")
    refinement: Refinement


@dataclass
class Job:
    """One progressive answer: its stages so far and the task refining it."""

    id: str
    dataset: str
    user_id: str
    answers: dict[Stage, NextItemPrediction]
    state: JobState = "running"
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def stage(self) -> Stage:
        return [s for s in STAGES if s in self.answers][-1]

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def snapshot(self, stage: Stage | None = None) -> NextItemAnswer:
        """The latest answer (or `stage`'s) and the refinement's state."""
        st = stage or self.stage
        ref = Refinement(state=self.state, stage=st, stages_done=[s for s in STAGES if s in self.answers],
                         started_at=round(self.started_at, 3), updated_at=round(self.updated_at, 3),
                         elapsed_s=round(self.updated_at - self.started_at, 3), error=self.error)
        return NextItemAnswer(**dict(self.answers[st]), recommendation_id=self.id, refinement=ref)

    async def advance(self, stage: Stage, pred: NextItemPrediction) -> None:
        """Record a stage's answer and wake the waiters."""
        async with self.changed:
            self.answers[stage] = pred
            self.updated_at = time.time()
            self.changed.notify_all()

    async def finish(self, state: JobState, error: str | None = None) -> None:
        async with self.changed:
            self.state, self.error = state, error
            self.updated_at = time.time()
            self.changed.notify_all()

    async def wait(self, timeout_s: float) -> None:
        """Until the job finishes or `timeout_s` seconds pass (no error either way)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self.changed:
                await self.changed.wait_for(lambda: self.finished)

    async def follow(self) -> AsyncIterator[tuple[Stage, NextItemPrediction]]:
        """Each stage's answer once, in order (those already reached first), until the job ends."""
        sent: set[Stage] = set()
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: self.finished or set(self.answers) - sent)
                new = [s for s in STAGES if s in self.answers and s not in sent]
                done = self.finished
            for s in new:
                sent.add(s)
                yield s, self.answers[s]
            if done and not set(self.answers) - sent:
                return


Refine = Callable[[Job], Awaitable[None]]


def stage_of(pred: NextItemPrediction) -> Stage:
    """What a prediction is: ``explained`` (some reason is the model's), ``refined`` (the model
    scored the ranking) or ``fast`` (neither: the pipeline without the model)."""
    if any(i.reason_source == "model" for i in pred.items):
        return "explained"
    if any("llm" in i.source_scores for i in pred.items):
        return "refined"
    return "fast"


class ProgressiveJobs:
    """The progressive answers of one runtime, by recommendation id.

    Args:
        max_jobs: answers kept for polling; the oldest finished one is dropped first.
        max_running: refinements at once; above it a new answer is served fast with the
            refinement ``skipped`` (the model's own lanes bound the calls; this bounds the queue).
        ttl_s: seconds an answer stays pollable.
    """

    def __init__(self, *, max_jobs: int = 2000, max_running: int = 32, ttl_s: float = 3600.0):
        self.max_jobs, self.max_running, self.ttl_s = max_jobs, max_running, ttl_s
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    def running(self) -> int:
        return sum(not j.finished for j in self.jobs.values())

    def start(self, dataset: str, user_id: str, fast: NextItemPrediction, refine: Refine | None,
              why_not: str | None = None, stage: Stage = "fast") -> Job:
        """Register an answer and, with `refine`, start refining it in the background.

        `refine(job)` advances the job through its stages; whatever it raises fails the job (the
        fast answer stays). Without `refine` the job is ``skipped`` with `why_not`, or ``done``
        when the answer given is already past the fast `stage` (a blocking call's answer).
        """
        self._evict()
        job = Job(id=uuid.uuid4().hex, dataset=dataset, user_id=user_id, answers={stage: fast})
        if refine is None:
            job.state, job.error = ("skipped", why_not) if stage == "fast" else ("done", why_not)
        elif self.running() >= self.max_running:
            job.state = "skipped"
            job.error = (f"{self.max_running} refinements are already running: the fast answer is "
                         "served; ask again later for the model's")
        else:
            job.task = asyncio.create_task(self._run(job, refine), name=f"shoplens-refine-{job.id}")
        self.jobs[job.id] = job
        return job

    def get(self, rec_id: str) -> Job:
        """The job, or `UnknownRecommendationError` (404)."""
        self._evict()
        job = self.jobs.get(rec_id)
        if job is None:
            raise UnknownRecommendationError(rec_id, self.ttl_s)
        return job

    async def aclose(self) -> None:
        """Cancel the running refinements (at shutdown)."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for j in self.jobs.values():  # a task cancelled before it ran never marked its job
            if not j.finished:
                await j.finish("failed", "cancelled (server shutting down)")

    async def _run(self, job: Job, refine: Refine) -> None:
        try:
            await refine(job)
            if job.state == "running":
                await job.finish("done")
        except asyncio.CancelledError:
            await job.finish("failed", "cancelled (server shutting down)")
            raise
        except Exception as e:  # noqa: BLE001 - the fast answer stands; the job says why
            await job.finish("failed", f"{type(e).__name__}: {e}")

    def _evict(self) -> None:
        now = time.time()
        for jid in [jid for jid, j in self.jobs.items() if j.finished and now - j.updated_at > self.ttl_s]:
            del self.jobs[jid]
        while len(self.jobs) > self.max_jobs:
            oldest = next((jid for jid, j in self.jobs.items() if j.finished), None)
            if oldest is None:
                break
            del self.jobs[oldest]
