"""Next-item methods of `ShopLensService`: the one pipeline (`next_item`), its progressive form
(fast answer, then the model's refinement: `agent.app.progressive`), stored answers
(`agent.app.answers`; the runner and worker: `agent.app.precompute`) and batches."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from agent.app.answers import (
    BatchError,
    NextItemBatch,
    StoredAnswer,
    pipeline_version,
    stale_reason,
)
from agent.app.events import check_candidates, parse_as_of
from agent.app.feedback import Stage as ShownStage
from agent.app.policy import mark_unavailable, run_task
from agent.app.progressive import Job, NextItemAnswer, ProgressiveJobs, stage_of
from agent.app.service_base import ServiceBase
from agent.data.artifacts import catalog_hash
from agent.domain.errors import CallerError, UnknownUserError
from agent.domain.history import OWNED_EVENT_TYPES
from agent.domain.predictions import (
    NextItemPrediction,
)
from agent.domain.schemas import BehaviorEvent
from agent.llm.base import ChatModel
from agent.tasks.fusion import held_out_windows, read_fusion, sequences_hash
from agent.tasks.llm_weight import (
    PARTIAL_FILE,
    SETS_FILE,
    FittedLlmWeight,
    ScoredSet,
    append_partial,
    choose_weight,
    read_partial,
    run_key,
    save_llm_weight,
    window_table,
)
from agent.tasks.next_item import NextItemConfig, NextItemService

log = logging.getLogger(__name__)


class NextItemMethods(ServiceBase):
    """Mixed into `ShopLensService`."""

    # ---- next item ------------------------------------------------------------------------
    def next_item_config(self, *, k: int = 5, repurchase: bool = False, use_model: bool = True) -> NextItemConfig:
        """The next-item configuration from `Settings` (candidates, LLM scorer and weight,
        permutations, window, attempts): the one configuration the API, the CLI, the chat and the
        eval harness's `--ranker pipeline` start from."""
        s = self.runtime.settings
        return NextItemConfig(k=k, repurchase=repurchase, use_llm_ranking=use_model, explain=use_model,
                              n_candidates=max(s.n_candidates, k), permutations=s.permutations,
                              llm_scorer=s.llm_scorer, llm_weight=s.llm_weight, window=s.history_window,
                              max_attempts=s.llm_max_attempts,
                              prompt_budget_tokens=s.prompt_budget_tokens or None)

    async def next_item(self, dataset: str, user_id: str, *, events: Sequence[BehaviorEvent] | None = None,
                        config: NextItemConfig | None = None, as_of: datetime | str | float | None = None,
                        use_model: bool | None = None, candidates: Sequence[str] | None = None,
                        on_ranked: Callable[[NextItemPrediction], Awaitable[None]] | None = None,
                        ) -> NextItemPrediction:
        """Top-k next items for a stored user or for inline events (then the store is not read;
        each event_id counts once, see `history`);
        with `candidates`, a ranking of exactly those catalogue ids instead of retrieved ones;
        `on_ranked` is awaited with the ranking before the explanation call (see
        `NextItemService.predict`).

        Raises:
            UnknownDatasetError / UnknownUserError / RequestError: caller mistakes.
        """
        use = self._use(use_model)
        when = parse_as_of(as_of)
        uid = self.stored_id(user_id)
        await self.state.ensure_indexes(dataset)
        cfg = config or self.next_item_config(use_model=use)
        arts = self.runtime.artifacts(dataset)
        if candidates is not None:
            check_candidates(candidates, arts.catalog)
        notes: list[str] = []
        try:
            hist = self.history(dataset, uid, events, before=when, notes=notes)
        except UnknownUserError as e:
            raise self._unknown(e, user_id) from e
        sha = self.runtime.model_sha256

        async def run(model: ChatModel | None, why: str | None) -> NextItemPrediction:
            pred = await NextItemService(model, model_sha256=sha).predict(uid, hist, arts, cfg, as_of=when,
                                                                          candidates=candidates,
                                                                          on_ranked=on_ranked)
            return mark_unavailable(pred, why, notes)

        async def fallback() -> NextItemPrediction:
            pred = await NextItemService(None, model_sha256=sha).predict(
                uid, hist, arts, replace(cfg, use_llm_ranking=False, explain=False), as_of=when,
                candidates=candidates)
            pred.meta.degraded_reason = "ranked by retrieval fusion only"
            return mark_unavailable(pred, None, notes)

        pred = await run_task(self._source(), run, use_model=use, deadline_s=self.deadline, fallback=fallback,
                              min_retry_after_s=self.min_retry_after_s)
        pred.user_id = user_id
        return pred

    # ---- the model's weight, fitted on validation users (agent.tasks.llm_weight) ---------------
    async def train_llm_weight(self, dataset: str, *, windows: int = 30, seed: int = 0,
                               kinds: Sequence[str] = ("random", "retrieved"),
                               progress: Callable[[int, int], None] | None = None,
                               ) -> tuple[FittedLlmWeight, Path]:
        """Fit the model's share of the dataset's next-item score on `windows` validation windows
        and save ``llm_weight.json`` (see `agent.tasks.llm_weight` for the procedure); this
        process serves it from now on, others when they load the dataset.

        Each window's candidate sets go through `NextItemService.predict` with the served
        configuration (scorer, prompt, history window, prompt budget), the dataset's fusion, and
        the model ranking at weight 1 to read its scores; sets already scored by an interrupted
        run with the same data, model, scorer and seed are read back from
        ``llm_weight.partial.jsonl`` (resume). About 2 x 10-15 s of model time per window with the
        embedded 1.5B verbalizer on 2 cores.

        Args:
            windows: validation windows to score (warm targets, seeded, as ``shoplens train``).
            kinds: candidate sets per window: ``random`` (the target and n-1 counted items the
                user never touched) and/or ``retrieved`` (the served pool, when it holds the target).

        Raises:
            ValueError: too few users or warm windows, unknown `kinds`, or fewer than 5 windows
                the model scored.
            ModelUnavailableError: the model cannot be reached.
        """
        unknown = sorted(set(kinds) - {"random", "retrieved"})
        if unknown or not kinds:
            raise ValueError(f"kinds {unknown or list(kinds)}: use random and/or retrieved")
        arts = self.runtime.artifacts(dataset)
        ho = held_out_windows(arts, seed=seed, what="fitting the model weight")
        chosen = ho.warm[:windows]
        base = self.next_item_config(k=1, use_model=True)
        n = base.n_candidates
        cfg = replace(base, k=n, n_candidates=n, explain=False, use_llm_ranking=True, llm_weight=1.0)
        scorer, prompt = self.runtime.scorer_identity()
        model_id = self.runtime.model_identity()
        key = run_key({"dataset": dataset, "events": sequences_hash(arts.user_items),
                       "catalogue": catalog_hash(arts.catalog), "model": model_id, "scorer": scorer,
                       "prompt": prompt, "seed": seed, "n": n, "window": cfg.window,
                       "fusion": arts.fusion_weights, "budget": cfg.prompt_budget_tokens})
        folder = self.runtime.settings.index_dir(dataset)
        partial = folder / PARTIAL_FILE
        sets = read_partial(partial, key)
        have = {(x.user_id, x.target, x.kind) for x in sets}
        svc = NextItemService(await self._source()(), model_sha256=self.runtime.model_sha256)
        gen = ho.artifacts.generator()
        rng = random.Random(seed)
        unscored = 0
        for k, w in enumerate(chosen):
            events = self.history(dataset, w.user_id)
            while events and events[-1].item_id == w.target:  # the held-out target's events
                events.pop()
            seq = [e.item_id for e in events]
            seen = set(seq) | {w.target}
            negatives = [i for i in ho.counted if i not in seen]
            easy = rng.sample(negatives, min(n - 1, len(negatives)))  # drawn even when resumed
            cand_sets: dict[str, list[str]] = {}
            if "random" in kinds:
                cand_sets["random"] = [w.target, *easy]
            if "retrieved" in kinds:
                owned = {e.item_id for e in events if e.event_type in OWNED_EVENT_TYPES}
                pool = [c.item_id for c in gen.generate(seq, n=n, user_id=w.user_id, exclude=owned)]
                if w.target in pool:
                    cand_sets["retrieved"] = pool
            for kind, ids in cand_sets.items():
                if (w.user_id, w.target, kind) in have:
                    continue
                pred = await svc.predict(w.user_id, events, ho.artifacts, cfg, candidates=ids)
                llm = {i.item_id: i.source_scores["llm"] for i in pred.items if "llm" in i.source_scores}
                if not llm:  # the model did not score (unreachable, or no labels): not saved, retried on resume
                    unscored += 1
                    continue
                fused = {c.item_id: c.fused for c in gen.score(seq, ids, user_id=w.user_id)}
                scored = ScoredSet(user_id=w.user_id, target=w.target, kind=kind, fused=fused, llm=llm)
                append_partial(partial, key, scored)
                sets.append(scored)
            if progress:
                progress(k + 1, len(chosen))
        ids, table = window_table(sets)
        choice = choose_weight(table, seed=seed)
        metrics: dict[str, object] = {**asdict(choice), "sets_by_kind": {kd: sum(x.kind == kd for x in sets)
                                                                         for kd in kinds},
                                      "unscored_sets": unscored, "kinds": list(kinds)}
        fitted = FittedLlmWeight(weight=choice.served, best_weight=choice.best, dataset=dataset,
                                 catalogue_hash=catalog_hash(arts.catalog), events_hash=sequences_hash(arts.user_items),
                                 model=model_id, scorer=scorer, prompt=prompt, n_windows=len(ids), n_sets=len(sets),
                                 seed=seed, metrics=metrics, fitted_at=datetime.now(UTC).isoformat(timespec="seconds"))
        path = save_llm_weight(fitted, folder)
        partial.replace(folder / SETS_FILE)  # kept: the choice can be rechecked without the model
        arts.llm_weight, arts.llm_weight_note = self.runtime.served_llm_weight(dataset)
        return fitted, path

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
        elif (down := self.runtime.model_down()) is not None:
            # a refinement now would fail at once and only run the pipeline again without the
            # model, taking CPU from the fast path (seen with the model server killed under load)
            why_not = f"{down}: the fast answer stands; ask again later for the model's refinement"
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

    def _shown(self, job: Job, stage: ShownStage, pred: NextItemPrediction) -> None:
        """Log what this recommendation id shows now (feedback counts against the last list)."""
        try:
            self.runtime.feedback.log_recommendation(job.id, job.dataset, job.user_id,
                                                     [i.item_id for i in pred.items], stage)
        except Exception:  # noqa: BLE001 - a feedback log failure must not fail the answer
            log.exception("could not log recommendation %s", job.id)

    # ---- precomputed next item (agent.app.answers; the runner and worker: agent.app.precompute) --
    def next_item_version(self, dataset: str, *, k: int, use_model: bool) -> str:
        """`agent.app.answers.pipeline_version` of the served next-item configuration for this
        dataset: its fusion weights and model weight as this process ranks with them (else as
        ``fusion.json`` and ``llm_weight.json`` hold them), its item-index manifest, and the
        configured model (the packaged GGUF's sha256, or ``SHOPLENS_LLM_MODEL`` for a server).
        Reads three small files; starts nothing."""
        s = self.runtime.settings
        arts = self.runtime.loaded_artifacts(dataset)
        folder = s.index_dir(dataset)
        if arts is not None:
            weights = arts.fusion_weights
        else:
            try:
                weights = read_fusion(folder).served()[0]
            except FileNotFoundError:
                weights = None
        try:
            manifest: str | None = hashlib.sha256((folder / "items" / "manifest.json").read_bytes()).hexdigest()
        except FileNotFoundError:
            manifest = None
        llm_weight = arts.llm_weight if arts is not None else self.runtime.served_llm_weight(dataset)[0]
        return pipeline_version(self.next_item_config(k=k, use_model=use_model), model=self.runtime.model_identity(),
                                fusion_weights=weights, index_manifest_sha256=manifest, llm_weight=llm_weight)

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
        self._shown(job, "precomputed", pred)
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
