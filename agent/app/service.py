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
import logging
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Literal

from agent.app.churn_methods import ChurnBlendMethods
from agent.app.events import parse_as_of
from agent.app.model_holder import ModelWatch
from agent.app.next_item_methods import NextItemMethods
from agent.app.policy import mark_unavailable
from agent.app.results import SentimentBatch, SentimentBatchMeta
from agent.app.sentiment_scores import SentimentScoreStore
from agent.domain.errors import RequestError
from agent.domain.predictions import (
    AudiencePrediction,
    ChurnPrediction,
    ClickPrediction,
    IntentPrediction,
    SentimentFailure,
    SentimentResult,
    SessionIntentPrediction,
    UserProfile,
)
from agent.llm.base import ChatModel, ModelUnavailableError
from agent.tasks.audience import (
    POOL,
    PREDICTED_WEIGHTS,
    AudienceIndex,
    AudienceService,
    predicted_raw,
    rank_users,
)
from agent.tasks.churn import ChurnService
from agent.tasks.click import ClickScorer, ClickService
from agent.tasks.encoder_cases import EncoderTask
from agent.tasks.encoder_train import EncoderScorer
from agent.tasks.intent import IntentService, Scorer
from agent.tasks.profile import ProfileService, catalogue_prices
from agent.tasks.sentiment import SentimentAnalyzer, SentimentConfig
from agent.tasks.sentiment.fewshot import DemoPool
from agent.tasks.session_intent import SessionIntentService
from retrieval.embedder import Embedder

log = logging.getLogger(__name__)
PROFILE_HINT = ("Retry later, or ask without the model (use_llm=false, or --no-llm) for the computed "
                "profile with a template summary.")


class ShopLensService(NextItemMethods, ChurnBlendMethods):
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

    # ---- intent, session intent, churn, profile, audience -----------------------------------
    async def intent(self, dataset: str, user_id: str, item_id: str, *, as_of: datetime | str | float | None = None,
                     horizon_hours: float = 48.0, use_model: bool | None = None,
                     scorer: Scorer | None = None) -> IntentPrediction:
        """P(the user buys `item_id` within `horizon_hours`), blended with the model, cited.
        An unknown user gets a cold-start answer (the note says so). `scorer`: see `IntentService`.

        Raises:
            RequestError: (``scorer``) bert or blend without a trained encoder for this dataset;
                (``horizon_hours``) a horizon other than the encoder's.
        """
        when, uid = parse_as_of(as_of), self.stored_id(user_id)
        catalog = await asyncio.to_thread(self.state.catalog, dataset)
        encoder = (await asyncio.to_thread(self.state.encoder, dataset, "purchase")
                   if scorer in ("bert", "blend") else None)
        if encoder is not None:
            encoder.check_horizon(horizon_hours)
        note = await self.state.baselines.ensure("intent", dataset, horizon_hours)
        bl = self.state.baselines.intent(dataset, horizon_hours)
        notes = [note] if note else []
        events = self._events_or_note(dataset, uid, user_id, notes)

        async def run(model: ChatModel | None, why: str | None) -> IntentPrediction:
            svc = IntentService(model, bl, model_sha256=self.runtime.model_sha256, explain=self.explain,
                                scorer=scorer, encoder=encoder)
            pred = await svc.predict(uid, item_id, events, catalog, as_of=when, horizon_hours=horizon_hours,
                                     dataset=dataset)
            return mark_unavailable(pred, why, notes)

        pred: IntentPrediction = await self._run(run, use_model=self._use(use_model))
        pred.user_id = user_id
        return pred

    async def click(self, dataset: str, user_id: str, item_id: str, *, as_of: datetime | str | float | None = None,
                    horizon_hours: float | None = None, scorer: ClickScorer = "blend") -> ClickPrediction:
        """P(the user views or clicks `item_id` within the click encoder's horizon): the dataset's
        trained click encoder (`agent.tasks.click`), no generative model. An unknown user gets the
        labelled base rate.

        Raises:
            RequestError: (``dataset``) no click encoder trained for the dataset, or it fails its
                manifest check (the message gives the train command); (``horizon_hours``) a
                horizon other than the encoder's.
        """
        when, uid = parse_as_of(as_of), self.stored_id(user_id)
        catalog = await asyncio.to_thread(self.state.catalog, dataset)
        encoder = await asyncio.to_thread(self.state.encoder, dataset, "click", "dataset")
        notes: list[str] = []
        events = self._events_or_note(dataset, uid, user_id, notes)
        pred = await asyncio.to_thread(ClickService(encoder, scorer).predict, uid, item_id, events, catalog,
                                       as_of=when, horizon_hours=horizon_hours, dataset=dataset)
        pred.meta.notes += notes
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
        """P(no purchase within `horizon_days` after `as_of`; default: the dataset's end): the baseline, with the
        model's P(churn) blended in only where a fitted blend gave it a weight (`served_churn_blend`)."""
        uid = self.stored_id(user_id)
        catalog = await asyncio.to_thread(self.state.catalog, dataset)
        when = parse_as_of(as_of)
        if when is None:
            when = await asyncio.to_thread(self.state.dataset_end, dataset)
        note = await self.state.baselines.ensure("churn", dataset, horizon_days)
        bl = self.state.baselines.churn(dataset, horizon_days)
        served = await asyncio.to_thread(self.served_churn_blend, dataset, horizon_days, bl)
        notes = [note] if note else []
        events = self._events_or_note(dataset, uid, user_id, notes)

        async def run(model: ChatModel | None, why: str | None) -> ChurnPrediction:
            svc = ChurnService(model, bl, model_sha256=self.runtime.model_sha256, explain=self.explain, blend=served)
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
                       n: int = 50, score_top: int = 3, use_model: bool | None = None,
                       predicted: EncoderTask | None = None) -> AudiencePrediction:
        """The `n` users most likely to buy `item_id` (or answer `campaign_text`), ranked by
        retrieval fusion; the model scores and explains the top `score_top`. User ids are as
        stored (pseudonymised when configured).

        Args:
            predicted: ``click`` or ``purchase``: one more source, the dataset's trained encoder's
                P(the user clicks / buys the item within its horizon, from the dataset's end)
                over the top `POOL` users of the retrieval sources (`POOL_WEIGHTS`), fused with
                `PREDICTED_WEIGHTS`.

        Raises:
            RequestError: neither `item_id` nor `campaign_text` (param ``item_id``); `predicted`
                without `item_id`, or with no such trained encoder (param ``predicted``).
        """
        if not item_id and not campaign_text:
            raise RequestError("give item_id or campaign_text", code="missing", param="item_id")
        if predicted and not item_id:
            raise RequestError("predicted: the encoder scores (user, item) pairs; give item_id (a campaign text "
                               "has no item to score)", param="predicted")
        encoder = await asyncio.to_thread(self.state.encoder, dataset, predicted, "predicted") if predicted else None
        await self.state.ensure_indexes(dataset)
        idx = await asyncio.to_thread(self.state.audience_index, dataset)  # built once, off the event loop
        query = None
        if campaign_text and not item_id:  # embedded by the model the dataset's indexes were built with
            query = self.runtime.embedder_for(dataset).embed([campaign_text])[0]
        weights: dict[str, float] | None = None
        extra: dict[str, dict[str, float]] | None = None
        notes: list[str] = []
        if encoder is not None and item_id:
            weights, extra, notes = await asyncio.to_thread(self._predicted_source, dataset, idx, item_id, encoder)

        async def run(model: ChatModel | None, why: str | None) -> AudiencePrediction:
            top = score_top if model is not None else 0
            svc = AudienceService(model, model_sha256=self.runtime.model_sha256, score_top=top)
            ranked = [u for u, _, _ in rank_users(idx, item_id, query, n=top, weights=weights, extra=extra)] if top else []
            pred = await svc.predict(idx, item_id=item_id, campaign_text=campaign_text, query=query, n=n,
                                     dataset=dataset, user_events={u: self.history(dataset, u) for u in ranked},
                                     weights=weights, extra_sources=extra, notes=notes)
            return mark_unavailable(pred, why)

        return await self._run(run, use_model=self._use(use_model))

    def _predicted_source(self, dataset: str, idx: AudienceIndex, item_id: str, encoder: EncoderScorer
                          ) -> tuple[dict[str, float], dict[str, dict[str, float]], list[str]]:
        """(weights, {"predicted": user -> P}, notes) for `audience(predicted=...)`; blocking
        (SQLite reads of the pool's events and the encoder): call in a thread."""
        as_of = self.state.dataset_end(dataset) + timedelta(seconds=1)
        scores = predicted_raw(idx, item_id, encoder, lambda u: self.history(dataset, u), as_of)["predicted"]
        pool = list(scores)
        weights = PREDICTED_WEIGHTS[encoder.task]
        cuts = encoder.trained.manifest.get("cutoffs") or ["?"]
        return weights, {"predicted": scores}, [
            f"predicted source: the {encoder.task} encoder's P (blend; trained on cut-offs {cuts[0]} .. {cuts[-1]}) "
            f"within {encoder.horizon_h:g} h of {as_of:%Y-%m-%d %H:%M}, over the retrieval sources' top {len(pool)} "
            f"users (of at most {POOL}); weights {weights}"
            + ("" if pool else "; no user was found by the retrieval sources, so the encoder scored nobody")
            + ("" if weights.get("predicted") else "; the encoder has weight 0 here: on the validation days it did "
               "not improve the ranking (docs/tasks_results.md), so it does not change this answer")]

    # ---- sentiment ------------------------------------------------------------------------
    async def sentiment(self, texts: Sequence[object], *, aspects: bool = False, use_model: bool | None = None,
                        on_done: Callable[[int, SentimentResult | SentimentFailure], None] | None = None,
                        deadline_s: float | None | Literal["service"] = "service",
                        scores: SentimentScoreStore | None = None, concurrency: int = 1,
                        config: SentimentConfig | None = None, demos: DemoPool | None = None,
                        embedder: Embedder | None = None) -> SentimentBatch:
        """Polarity (and optionally aspects) of each text, in order. Texts are cleaned (HTML,
        personal data, instruction-like sentences) before the model sees them; a text that cannot
        be judged is a `SentimentFailure`, never an abort. Without the model, or once it fails or
        the deadline passes, the rest is judged by the labelled lexicon fallback.

        Args:
            on_done: called with (index, result) as each text is judged (a progress bar); stored
                scores are reported first.
            deadline_s: the whole batch's deadline in seconds; "service": the service's deadline;
                None: none (a file batch; each model call is still bounded by the guard).
            scores: stored scores to reuse and to add to as each text is judged (a re-run scores
                only new texts; an interrupted run resumes). None: nothing stored.
            concurrency: model requests in flight at once (a vLLM server takes many).
            config: the analyzer's settings (default `SentimentConfig()`; ``joint=True`` is the
                one-call path; ``label_offset`` the shop's fitted decision offset).
            demos, embedder: a shop's labelled reviews (`agent.tasks.sentiment.fewshot.DemoPool`)
                and the embedder that built it: each review gets its nearest demonstrations
                (``sentiment_fewshot.v1``).
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
        analyzer = SentimentAnalyzer(model, model_sha256=self.runtime.model_sha256, config=config,
                                     unavailable_reason=why, demos=demos, embedder=embedder)
        keys = {i: analyzer.score_key(t, aspects) for i, t in enumerate(texts) if isinstance(t, str)} \
            if scores is not None and model is not None else {}

        def record(i: int, r: SentimentResult | SentimentFailure) -> None:
            done[i] = r
            if scores is not None and i in keys and isinstance(r, SentimentResult):
                scores.put(keys[i], r)
            if on_done is not None:
                on_done(i, r)

        stored = scores.get_many(list(keys.values())) if scores is not None and keys else {}
        for i, k in keys.items():
            if k in stored:
                done[i] = stored[k].model_copy(deep=True)
                if on_done is not None:
                    on_done(i, done[i])
        todo = [i for i in range(len(texts)) if i not in done]
        try:
            async with asyncio.timeout(limit):
                await analyzer.analyze_batch([texts[i] for i in todo], aspects=aspects, on_done=record,
                                             concurrency=concurrency, indices=todo)
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
                                  by_lexicon=sum(r.source == "lexicon" for r in ok), failed=len(texts) - len(ok),
                                  reused=len(texts) - len(todo))
        return SentimentBatch(results=results, meta=meta)


async def _lexicon_one(lex: SentimentAnalyzer, i: int, text: object) -> SentimentResult | SentimentFailure:
    try:
        if text is None or (isinstance(text, float) and math.isnan(text)):
            raise ValueError("review text is missing")
        return await lex.analyze(text if isinstance(text, str) else str(text), aspects=False)
    except ValueError as e:
        return SentimentFailure(index=i, error=str(e))

