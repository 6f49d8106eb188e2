"""The one service facade every surface calls: the CLI, the JSON API, the chat (and bench).

`ShopLensService` resolves a request (a caller's user id, or inline events) to a masked history,
picks the dataset's artifacts, baseline and the model, and runs the task pipeline under one
timeout-and-degrade policy (`agent.app.policy`). The same method gives the same answer whichever
surface calls it:

* tasks: `next_item`, `intent`, `session_intent`, `churn`, `profile`, `audience`, `sentiment`
  (a batch, with the labelled lexicon fallback), `churn_segment`;
* data (`agent.app.data_methods`): `ingest_events`, `user_events`, `forget_user`, `datasets`.

User ids are the caller's: pseudonymised to the stored id when `Settings.pseudonymise_key` is
set, and answers carry the caller's id back. Review text is masked (`mask_pii`) in the one
`history()` every task reads, so e-mails and phone numbers never reach a prompt. Caller mistakes
raise `CallerError` subclasses (`UnknownDatasetError`, `UnknownUserError`, `RequestError`);
model trouble becomes labelled degraded answers, or `ModelUnavailableError` for a strict call
whose answer is the model's work.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal

from agent.app.answers import (
    BatchError,
    NextItemBatch,
    StoredAnswer,
    pipeline_version,
    stale_reason,
)
from agent.app.data_methods import DataMethods
from agent.app.events import Pseudonyms, check_candidates, parse_as_of
from agent.app.model_holder import ModelSource, ModelWatch
from agent.app.policy import P, Run, mark_unavailable, run_task
from agent.app.progressive import Job, NextItemAnswer, ProgressiveJobs, Stage, stage_of
from agent.app.results import SentimentBatch, SentimentBatchMeta
from agent.app.runtime import Runtime
from agent.domain.errors import CallerError, RequestError, UnknownUserError
from agent.domain.pii import mask_pii
from agent.domain.predictions import (
    AudiencePrediction,
    ChurnPrediction,
    IntentPrediction,
    NextItemPrediction,
    SentimentFailure,
    SentimentResult,
    SessionIntentPrediction,
    UserProfile,
)
from agent.domain.schemas import BehaviorEvent
from agent.llm.base import ChatModel, ModelUnavailableError
from agent.llm.servers.embedded import PROFILES
from agent.tasks.audience import AudienceService, rank_users
from agent.tasks.churn import ChurnService
from agent.tasks.fusion import FUSION_FILE
from agent.tasks.intent import IntentService
from agent.tasks.next_item import NextItemConfig, NextItemService
from agent.tasks.profile import ProfileService, catalogue_prices
from agent.tasks.sentiment import SentimentAnalyzer
from agent.tasks.session_intent import SessionIntentService

log = logging.getLogger(__name__)
PROFILE_HINT = ("Retry later, or ask without the model (use_llm=false, or --no-llm) for the computed "
                "profile with a template summary.")


class ShopLensService(DataMethods):
    """Task and data entry points over one `Runtime` (cheap to build: the caches live in
    `runtime.state`, shared by every service over the runtime).

    Args:
        runtime: the composition root (store, embedder, artifacts, the guarded model).
        use_model: the default for every call's `use_model`; False answers without the model
            (e.g. `--no-llm`).
        model_provider: where the model comes from; default `runtime.model_source()` (the
            background holder in a server, which answers "still loading" at once, else
            `runtime.model`).
        explain: intent and churn also ask the model for a cited reason.
        deadline_s: one task call's deadline in seconds; default `Settings.request_timeout_s`.
        min_retry_after_s: the least `retry_after_s` a `ModelUnavailableError` reports.
    """

    def __init__(self, runtime: Runtime, *, use_model: bool = True, model_provider: ModelSource | None = None,
                 explain: bool = True, deadline_s: float | None = None, min_retry_after_s: float = 0.0):
        self.runtime = runtime
        self.use_model = use_model
        self.model_provider = model_provider
        self.explain = explain
        self.deadline_s = deadline_s
        self.min_retry_after_s = min_retry_after_s
        key = runtime.settings.pseudonymise_key
        secret = key.get_secret_value() if key is not None else ""
        self.pseudonyms = Pseudonyms(secret.encode() if secret else None)

    # ---- plumbing -------------------------------------------------------------------------
    @property
    def deadline(self) -> float:
        return self.deadline_s if self.deadline_s is not None else self.runtime.settings.request_timeout_s

    def _source(self) -> ModelSource:
        return self.model_provider or self.runtime.model_source()

    def _use(self, use_model: bool | None) -> bool:
        return self.use_model if use_model is None else use_model

    async def model_or_none(self) -> tuple[ChatModel | None, str | None]:
        """The model, or (None, reason) when it is disabled or cannot be had right now."""
        if not self.use_model:
            return None, "model disabled by the caller"
        try:
            return await self._source()(), None
        except ModelUnavailableError as e:
            log.warning("model unavailable: %s", e)
            return None, str(e)

    def require_dataset(self, dataset: str) -> None:
        """Raises UnknownDatasetError (param "dataset", listing the ingested ones)."""
        self.state.require_dataset(dataset)

    def _unknown(self, e: UnknownUserError, user_id: str) -> UnknownUserError:
        """The caller's id in the error; no close ids when ids are pseudonymised."""
        return UnknownUserError(e.dataset, user_id, [] if self.pseudonyms.active else e.suggestions)

    async def check_user(self, dataset: str, user_id: str) -> str:
        """The stored id of a known user.

        Raises:
            UnknownDatasetError: the dataset was never ingested.
            UnknownUserError: the store has no events for this user (the caller's id named).
        """
        await asyncio.to_thread(self.require_dataset, dataset)
        uid = self.stored_id(user_id)
        if not await asyncio.to_thread(self.runtime.store.has_user, dataset, uid):
            sugg = [] if self.pseudonyms.active else await asyncio.to_thread(
                self.runtime.store.similar_user_ids, dataset, uid)
            raise UnknownUserError(dataset, user_id, sugg)
        return uid

    def history(self, dataset: str, user_id: str, events: Sequence[BehaviorEvent] | None = None,
                *, before: datetime | None = None) -> list[BehaviorEvent]:
        """Inline events (sorted oldest first) if given, else the stored user's events; `user_id`
        is the stored id. Review text is passed through `mask_pii` here, so e-mails and phone
        numbers never reach a prompt, whichever way the events came in.

        Raises:
            UnknownUserError: no inline events and the store has no such user.
            RequestError: inline events name other users.
        """
        if events:
            others = sorted({e.user_id for e in events} - {user_id})
            if others:
                raise RequestError(f"inline events belong to other users {others[:3]}; "
                                   f"all must have user_id {user_id!r}", param="events")
            ordered = sorted(events, key=lambda e: e.timestamp)
            return _masked([e for e in ordered if before is None or e.timestamp < before])
        return _masked(self.runtime.store.user_events(dataset, user_id, before=before))

    def _events_or_note(self, dataset: str, uid: str, user_id: str, notes: list[str]) -> list[BehaviorEvent]:
        """The user's masked events, or [] with a cold-start note naming the caller's id."""
        try:
            return self.history(dataset, uid)
        except UnknownUserError as e:
            e = self._unknown(e, user_id)
            notes.append(f"user {user_id!r} is not in {dataset!r}"
                         + (f" (did you mean {', '.join(e.suggestions)}?)" if e.suggestions else ""))
            return []

    async def _run(self, run: Run[P], *, use_model: bool, fallback: bool = True, needs_model: str | None = None,
                   hint: str = "") -> P:
        async def without() -> P:
            return await run(None, None)

        return await run_task(self._source(), run, use_model=use_model, deadline_s=self.deadline,
                              fallback=without if fallback else None, needs_model=needs_model, hint=hint,
                              min_retry_after_s=self.min_retry_after_s)

    # ---- next item ------------------------------------------------------------------------
    def next_item_config(self, *, k: int = 5, repurchase: bool = False, use_model: bool = True) -> NextItemConfig:
        """The next-item configuration from `Settings` (candidates, LLM scorer, permutations, window,
        attempts): the one configuration the API, the CLI and the chat start from."""
        s = self.runtime.settings
        return NextItemConfig(k=k, repurchase=repurchase, use_llm_ranking=use_model, explain=use_model,
                              n_candidates=max(s.n_candidates, k), permutations=s.permutations,
                              llm_scorer=s.llm_scorer, window=s.history_window,
                              max_attempts=s.llm_max_attempts)

    async def next_item(self, dataset: str, user_id: str, *, events: Sequence[BehaviorEvent] | None = None,
                        config: NextItemConfig | None = None, as_of: datetime | str | float | None = None,
                        use_model: bool | None = None, candidates: Sequence[str] | None = None,
                        on_ranked: Callable[[NextItemPrediction], Awaitable[None]] | None = None,
                        ) -> NextItemPrediction:
        """Top-k next items for a stored user or for inline events (then the store is not read);
        with `candidates`, a ranking of exactly those catalogue ids instead of retrieved ones;
        `on_ranked` is awaited with the ranking before the explanation call (see
        `NextItemService.predict`).

        Raises:
            UnknownDatasetError / UnknownUserError / RequestError: caller mistakes.
        """
        use = self._use(use_model)
        when = parse_as_of(as_of)
        uid = self.stored_id(user_id)
        if events and self.pseudonyms.active:
            events = [e.model_copy(update={"user_id": self.stored_id(e.user_id)}) for e in events]
        await self.state.ensure_indexes(dataset)
        cfg = config or self.next_item_config(use_model=use)
        arts = self.runtime.artifacts(dataset)
        if candidates is not None:
            check_candidates(candidates, arts.catalog)
        try:
            hist = self.history(dataset, uid, events, before=when)
        except UnknownUserError as e:
            raise self._unknown(e, user_id) from e
        sha = self.runtime.model_sha256

        async def run(model: ChatModel | None, why: str | None) -> NextItemPrediction:
            pred = await NextItemService(model, model_sha256=sha).predict(uid, hist, arts, cfg, as_of=when,
                                                                          candidates=candidates,
                                                                          on_ranked=on_ranked)
            return mark_unavailable(pred, why)

        async def fallback() -> NextItemPrediction:
            pred = await NextItemService(None, model_sha256=sha).predict(
                uid, hist, arts, replace(cfg, use_llm_ranking=False, explain=False), as_of=when,
                candidates=candidates)
            pred.meta.degraded_reason = "ranked by retrieval fusion only"
            return pred

        pred = await run_task(self._source(), run, use_model=use, deadline_s=self.deadline, fallback=fallback,
                              min_retry_after_s=self.min_retry_after_s)
        pred.user_id = user_id
        return pred

    # ---- progressive next item --------------------------------------------------------------
    @property
    def progressive(self) -> ProgressiveJobs:
        """The runtime's progressive answers, by recommendation id."""
        return self.state.progressive

    def answered(self, dataset: str, user_id: str, pred: NextItemPrediction, *, asked_model: bool) -> NextItemAnswer:
        """A finished answer (a blocking call's) under a recommendation id: pollable and logged for
        feedback like a progressive one."""
        stage = stage_of(pred)
        why = None if asked_model else "the model was not asked for (use_llm=false)"
        job = self.progressive.start(dataset, user_id, pred, None, why_not=why, stage=stage)
        if asked_model and stage == "fast":
            job.state, job.error = "failed", pred.meta.degraded_reason or "the model did not score"
        self._shown(job, stage, pred)
        return job.snapshot()

    async def next_item_progressive(
        self, dataset: str, user_id: str, *, events: Sequence[BehaviorEvent] | None = None, k: int = 5,
        repurchase: bool = False, as_of: datetime | str | float | None = None,
        candidates: Sequence[str] | None = None, use_model: bool | None = None, wait_s: float = 0.0,
    ) -> NextItemAnswer:
        """The served pipeline without the model at once (milliseconds), refined by the model in
        the background: the LLM-scored ranking (stage ``refined``), then the model's reasons
        (``explained``, in the ``background`` model lane).

        Args:
            wait_s: seconds to wait for the refinement before answering with what is there
                (0: the fast answer at once). Poll `progressive.get(id)` for the rest.

        Returns:
            The latest stage's answer with its `recommendation_id` and `refinement` state.

        Raises:
            UnknownDatasetError / UnknownUserError / RequestError: caller mistakes (raised before
            anything is started).
        """
        use = self._use(use_model)
        fast_cfg = self.next_item_config(k=k, repurchase=repurchase, use_model=False)
        fast = await self.next_item(dataset, user_id, events=events, config=fast_cfg, as_of=as_of,
                                    use_model=False, candidates=candidates)
        refine = None
        why_not = None
        if not use:
            why_not = "the model was not asked for (use_llm=false)"
        elif fast.cold_start:
            why_not = "cold start: no history for the model to read; popularity ranking"
        else:
            cfg = replace(self.next_item_config(k=k, repurchase=repurchase, use_model=True),
                          explain_lane="background")

            async def refine(job: Job) -> None:
                async def ranked(pred: NextItemPrediction) -> None:
                    if stage_of(pred) == "refined":
                        pred.user_id = user_id
                        await job.advance("refined", pred)
                        self._shown(job, "refined", pred)

                pred = await self.next_item(dataset, user_id, events=events, config=cfg, as_of=as_of,
                                            use_model=True, candidates=candidates, on_ranked=ranked)
                stage = stage_of(pred)
                if stage == "fast":
                    await job.finish("failed", pred.meta.degraded_reason or "the model did not score")
                    return
                await job.advance(stage, pred)
                self._shown(job, stage, pred)
                await job.finish("done", pred.meta.degraded_reason if pred.meta.degraded else None)

        job = self.progressive.start(dataset, user_id, fast, refine, why_not)
        self._shown(job, "fast", fast)
        if wait_s > 0 and not job.finished:
            await job.wait(wait_s)
        return job.snapshot()

    def _shown(self, job: Job, stage: Stage, pred: NextItemPrediction) -> None:
        """Log what this recommendation id shows now (feedback counts against the last list)."""
        try:
            self.runtime.feedback.log_recommendation(job.id, job.dataset, job.user_id,
                                                     [i.item_id for i in pred.items], stage)
        except Exception:  # noqa: BLE001 - a feedback log failure must not fail the answer
            log.exception("could not log recommendation %s", job.id)

    # ---- precomputed next item (agent.app.answers; the runner and worker: agent.app.precompute) --
    def next_item_version(self, dataset: str, *, k: int, use_model: bool) -> str:
        """`agent.app.answers.pipeline_version` of the served next-item configuration for this
        dataset: its fusion weights as this process ranks with them (else as ``fusion.json`` holds
        them), its item-index manifest, and the configured model (the packaged GGUF's sha256, or
        ``SHOPLENS_LLM_MODEL`` for a server). Reads two small files; starts nothing."""
        s = self.runtime.settings
        arts = self.runtime.loaded_artifacts(dataset)
        folder = s.index_dir(dataset)
        if arts is not None:
            weights = arts.fusion_weights
        else:
            try:
                weights = json.loads((folder / FUSION_FILE).read_text(encoding="utf-8"))["weights"]
            except FileNotFoundError:
                weights = None
        try:
            manifest: str | None = hashlib.sha256((folder / "items" / "manifest.json").read_bytes()).hexdigest()
        except FileNotFoundError:
            manifest = None
        model = s.llm_model if s.llm_base_url else PROFILES[s.llm_profile].sha256
        return pipeline_version(self.next_item_config(k=k, use_model=use_model), model=model,
                                fusion_weights=weights, index_manifest_sha256=manifest)

    def active_users(self, dataset: str, *, since: datetime | str | float | None = None,
                     limit: int | None = None) -> list[str]:
        """Stored user ids of a dataset, sorted; with `since`, only those with an event at or after
        it (a precompute run's users). Blocking SQLite reads.

        Raises:
            UnknownDatasetError: the dataset was never ingested.
            RequestError: `since` is not a time (param ``as_of``).
        """
        self.require_dataset(dataset)
        return self.runtime.store.user_ids(dataset, since=parse_as_of(since), limit=limit)

    async def stored_next_item(self, dataset: str, user_id: str, k: int = 5) -> StoredAnswer | None:
        """The precomputed answer for this user and k (``shoplens precompute``, or the refresh
        worker), in milliseconds, under a new recommendation id logged with stage
        ``precomputed``; None when there is none (then compute one: `next_item`).

        A stale answer (the user's events or the pipeline changed since, see
        `agent.app.answers.stale_reason`) is still served, with `stale` and `stale_reason`, and
        its user is queued for a refresh. `meta.notes` says when it was computed and whether it is
        stale.
        """
        uid = self.stored_id(user_id)
        found = await asyncio.to_thread(self._stored_lookup, dataset, uid, k)
        if found is None:
            return None
        pred, computed_at, why = found
        pred.user_id = user_id
        when = datetime.fromtimestamp(computed_at, tz=UTC).isoformat(timespec="seconds")
        pred.meta.notes.append(f"precomputed at {when}; " + (f"stale: {why}; a refresh is queued" if why else "fresh"))
        stage = stage_of(pred)
        job = self.progressive.start(dataset, user_id, pred, None, stage=stage,
                                     why_not="precomputed without the model" if stage == "fast" else None)
        try:
            self.runtime.feedback.log_recommendation(job.id, dataset, user_id, [i.item_id for i in pred.items],
                                                     "precomputed")
        except Exception:  # noqa: BLE001 - a feedback log failure must not fail the answer
            log.exception("could not log recommendation %s", job.id)
        return StoredAnswer(**dict(job.snapshot()), computed_at=round(computed_at, 3), stale=why is not None,
                            stale_reason=why)

    def _stored_lookup(self, dataset: str, uid: str, k: int) -> tuple[NextItemPrediction, float, str | None] | None:
        """(the stored prediction, computed_at, why it is stale or None); a stale one is queued."""
        answers = self.runtime.answers
        entry = answers.get(dataset, uid, k)
        if entry is None:
            return None
        sha = self.runtime.store.user_events_sha256(dataset, uid)
        if sha is None:  # the user's events are gone: nothing to serve for them
            return None
        why = stale_reason(entry, sha, self.next_item_version(dataset, k=k, use_model=entry.use_model))
        if why is not None:
            answers.enqueue(dataset, uid)
        return entry.prediction, entry.computed_at, why

    async def next_item_batch(self, dataset: str, user_ids: Sequence[str], *, k: int = 5, use_model: bool = False,
                              stored: bool = True, concurrency: int = 4) -> NextItemBatch:
        """Next-item answers for many stored users: each user's precomputed answer when `stored`
        and there is one, else one computed now with the served configuration (`use_model`: with
        the model; each such user costs a full model answer). A user that cannot be answered (an
        unknown user, ...) gets an error entry; the others are answered.

        Args:
            concurrency: users computed at once (the model guard bounds the model calls anyway).

        Raises:
            UnknownDatasetError: the dataset was never ingested (no user could be answered).
        """
        await asyncio.to_thread(self.require_dataset, dataset)
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(user_id: str) -> NextItemAnswer:
            async with gate:
                if stored:
                    ans = await self.stored_next_item(dataset, user_id, k)
                    if ans is not None:
                        return ans
                cfg = self.next_item_config(k=k, use_model=use_model)
                pred = await self.next_item(dataset, user_id, config=cfg, use_model=use_model)
                return self.answered(dataset, user_id, pred, asked_model=use_model)

        results = await asyncio.gather(*(one(u) for u in user_ids), return_exceptions=True)
        answers: list[StoredAnswer | NextItemAnswer] = []
        errors: list[BatchError] = []
        for user_id, r in zip(user_ids, results, strict=True):
            if isinstance(r, NextItemAnswer):
                answers.append(r)
            elif isinstance(r, UnknownUserError):  # never lists other users' ids
                errors.append(BatchError(user_id=user_id, code=r.code, message=f"no user {user_id!r} in {dataset!r}"))
            elif isinstance(r, CallerError):
                errors.append(BatchError(user_id=user_id, code=r.code, message=str(r)))
            elif isinstance(r, Exception):
                log.error("next-item batch: user %r failed", user_id, exc_info=r)
                errors.append(BatchError(user_id=user_id, code="internal_error",
                                         message=f"{type(r).__name__}: {r}"))
            else:  # a BaseException (cancellation): not one user's problem
                raise r
        return NextItemBatch(answers=answers, errors=errors)

    # ---- intent, session intent, churn, profile, audience -----------------------------------
    async def intent(self, dataset: str, user_id: str, item_id: str, *, as_of: datetime | str | float | None = None,
                     horizon_hours: float = 48.0, use_model: bool | None = None) -> IntentPrediction:
        """P(the user buys `item_id` within `horizon_hours`), blended with the model, cited.
        An unknown user gets a cold-start answer (the note says so)."""
        when, uid = parse_as_of(as_of), self.stored_id(user_id)
        catalog = await asyncio.to_thread(self.state.catalog, dataset)
        note = await self.state.baselines.ensure("intent", dataset, horizon_hours)
        bl = self.state.baselines.intent(dataset, horizon_hours)
        notes = [note] if note else []
        events = self._events_or_note(dataset, uid, user_id, notes)

        async def run(model: ChatModel | None, why: str | None) -> IntentPrediction:
            svc = IntentService(model, bl, model_sha256=self.runtime.model_sha256, explain=self.explain)
            pred = await svc.predict(uid, item_id, events, catalog, as_of=when, horizon_hours=horizon_hours,
                                     dataset=dataset)
            return mark_unavailable(pred, why, notes)

        pred: IntentPrediction = await self._run(run, use_model=self._use(use_model))
        pred.user_id = user_id
        return pred

    async def session_intent(self, dataset: str, user_id: str, *, as_of: datetime | str | float | None = None,
                             horizon_hours: float | None = None, use_model: bool | None = None
                             ) -> SessionIntentPrediction:
        """P(the user buys anything later in the current session, or within `horizon_hours`)."""
        when, uid = parse_as_of(as_of), self.stored_id(user_id)
        catalog = await asyncio.to_thread(self.state.catalog, dataset)
        note = await self.state.baselines.ensure("session_intent", dataset, horizon_hours)
        bl = self.state.baselines.session_intent(dataset, horizon_hours)
        notes = [note] if note else []
        events = self._events_or_note(dataset, uid, user_id, notes)

        async def run(model: ChatModel | None, why: str | None) -> SessionIntentPrediction:
            svc = SessionIntentService(model, bl, model_sha256=self.runtime.model_sha256, explain=self.explain)
            pred = await svc.predict(uid, events, catalog, as_of=when, horizon_hours=horizon_hours, dataset=dataset)
            return mark_unavailable(pred, why, notes)

        pred: SessionIntentPrediction = await self._run(run, use_model=self._use(use_model))
        pred.user_id = user_id
        return pred

    async def churn(self, dataset: str, user_id: str, *, as_of: datetime | str | float | None = None,
                    horizon_days: int = 90, use_model: bool | None = None) -> ChurnPrediction:
        """P(no purchase within `horizon_days` after `as_of`; default: the dataset's end)."""
        uid = self.stored_id(user_id)
        catalog = await asyncio.to_thread(self.state.catalog, dataset)
        when = parse_as_of(as_of)
        if when is None:
            when = await asyncio.to_thread(self.state.dataset_end, dataset)
        note = await self.state.baselines.ensure("churn", dataset, horizon_days)
        bl = self.state.baselines.churn(dataset, horizon_days)
        notes = [note] if note else []
        events = self._events_or_note(dataset, uid, user_id, notes)

        async def run(model: ChatModel | None, why: str | None) -> ChurnPrediction:
            svc = ChurnService(model, bl, model_sha256=self.runtime.model_sha256, explain=self.explain)
            pred = await svc.predict(uid, events, catalog, as_of=when, horizon_days=horizon_days, dataset=dataset,
                                     prices=catalogue_prices(catalog))
            return mark_unavailable(pred, why, notes)

        pred: ChurnPrediction = await self._run(run, use_model=self._use(use_model))
        pred.user_id = user_id
        return pred

    async def profile(self, dataset: str, user_id: str, *, as_of: datetime | str | float | None = None,
                      use_model: bool | None = None, strict: bool = False) -> UserProfile:
        """Computed attributes plus a model-written summary whose claims cite the user's events.

        Args:
            strict: the summary is the model's job: when the model was wanted and is unavailable
                or too slow, raise instead of answering with a `[template]` summary.

        Raises:
            ModelUnavailableError: `strict` and the model could not write the summary.
        """
        when, uid = parse_as_of(as_of), self.stored_id(user_id)
        catalog = await asyncio.to_thread(self.state.catalog, dataset)
        notes: list[str] = []
        events = self._events_or_note(dataset, uid, user_id, notes)

        async def run(model: ChatModel | None, why: str | None) -> UserProfile:
            pred = await ProfileService(model, model_sha256=self.runtime.model_sha256).predict(
                uid, events, catalog, as_of=when, dataset=dataset)
            return mark_unavailable(pred, why, notes)

        pred: UserProfile = await self._run(run, use_model=self._use(use_model), fallback=not strict,
                                            needs_model="the profile summary" if strict else None,
                                            hint=PROFILE_HINT)
        pred.user_id = user_id
        return pred

    async def audience(self, dataset: str, *, item_id: str | None = None, campaign_text: str | None = None,
                       n: int = 50, score_top: int = 3, use_model: bool | None = None) -> AudiencePrediction:
        """The `n` users most likely to buy `item_id` (or answer `campaign_text`), ranked by
        retrieval fusion; the model scores and explains the top `score_top`. User ids are as
        stored (pseudonymised when configured).

        Raises:
            RequestError: neither `item_id` nor `campaign_text` (param ``item_id``).
        """
        if not item_id and not campaign_text:
            raise RequestError("give item_id or campaign_text", code="missing", param="item_id")
        await self.state.ensure_indexes(dataset)
        idx = await asyncio.to_thread(self.state.audience_index, dataset)  # built once, off the event loop
        query = None
        if campaign_text and not item_id:  # embedded by the model the dataset's indexes were built with
            query = self.runtime.embedder_for(dataset).embed([campaign_text])[0]

        async def run(model: ChatModel | None, why: str | None) -> AudiencePrediction:
            top = score_top if model is not None else 0
            svc = AudienceService(model, model_sha256=self.runtime.model_sha256, score_top=top)
            ranked = [u for u, _, _ in rank_users(idx, item_id, query, n=top)] if top else []
            pred = await svc.predict(idx, item_id=item_id, campaign_text=campaign_text, query=query, n=n,
                                     dataset=dataset, user_events={u: self.history(dataset, u) for u in ranked})
            return mark_unavailable(pred, why)

        return await self._run(run, use_model=self._use(use_model))

    # ---- sentiment ------------------------------------------------------------------------
    async def sentiment(self, texts: Sequence[object], *, aspects: bool = False, use_model: bool | None = None,
                        on_done: Callable[[int, SentimentResult | SentimentFailure], None] | None = None,
                        deadline_s: float | None | Literal["service"] = "service") -> SentimentBatch:
        """Polarity (and optionally aspects) of each text, in order. Texts are cleaned (HTML,
        personal data, instruction-like sentences) before the model sees them; a text that cannot
        be judged is a `SentimentFailure`, never an abort. Without the model, or once it fails or
        the deadline passes, the rest is judged by the labelled lexicon fallback.

        Args:
            on_done: called with (index, result) as each text is judged (a progress bar).
            deadline_s: the whole batch's deadline in seconds; "service": the service's deadline;
                None: none (a file batch; each model call is still bounded by the guard).
        """
        use = self._use(use_model)
        watch = ModelWatch(self._source(), self.min_retry_after_s)
        model: ChatModel | None = None
        why = "model disabled by the caller"
        if use:
            try:
                model = await watch.get()
            except ModelUnavailableError as e:
                why = f"model unavailable: {e}"
        limit = self.deadline if deadline_s == "service" else deadline_s
        done: dict[int, SentimentResult | SentimentFailure] = {}

        def record(i: int, r: SentimentResult | SentimentFailure) -> None:
            done[i] = r
            if on_done is not None:
                on_done(i, r)

        try:
            async with asyncio.timeout(limit):
                await SentimentAnalyzer(model, model_sha256=self.runtime.model_sha256, unavailable_reason=why
                                        ).analyze_batch(texts, aspects=aspects, on_done=record)
        except TimeoutError:  # the rest of the batch from the lexicon, labelled
            lex = SentimentAnalyzer(None, unavailable_reason=f"model did not answer within {limit:g} s")
            for i in range(len(texts)):
                if i not in done:
                    record(i, await _lexicon_one(lex, i, texts[i]))
        results = [done[i] for i in range(len(texts))]
        ok = [r for r in results if isinstance(r, SentimentResult)]
        reasons = [r.meta.degraded_reason for r in ok if r.meta.degraded and r.meta.degraded_reason]
        meta = SentimentBatchMeta(degraded=bool(reasons), degraded_reason=reasons[0] if reasons else None,
                                  n=len(texts), by_model=sum(r.source == "model" for r in ok),
                                  by_lexicon=sum(r.source == "lexicon" for r in ok), failed=len(texts) - len(ok))
        return SentimentBatch(results=results, meta=meta)


async def _lexicon_one(lex: SentimentAnalyzer, i: int, text: object) -> SentimentResult | SentimentFailure:
    try:
        if text is None or (isinstance(text, float) and math.isnan(text)):
            raise ValueError("review text is missing")
        return await lex.analyze(text if isinstance(text, str) else str(text), aspects=False)
    except ValueError as e:
        return SentimentFailure(index=i, error=str(e))


def _masked(events: list[BehaviorEvent]) -> list[BehaviorEvent]:
    return [
        e.model_copy(update={"review_text": mask_pii(e.review_text)}) if e.review_text else e
        for e in events
    ]
