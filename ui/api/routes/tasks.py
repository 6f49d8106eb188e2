"""The task routes: purchase intent (item and session), click, churn, profile, sentiment, audience."""

from __future__ import annotations

from fastapi import APIRouter

from agent.app.events import parse_as_of
from agent.domain.predictions import (
    AudiencePrediction,
    ChurnPrediction,
    ClickPrediction,
    IntentPrediction,
    SessionIntentPrediction,
    UserProfile,
)
from ui.api.deps import PREDICT, R503_MODEL, WITH_404, Api, Service
from ui.api.errors import ERROR_RESPONSES, ApiError
from ui.api.schemas import (
    AudienceRequest,
    ChurnRequest,
    ClickRequest,
    ProfileRequest,
    PurchaseIntentRequest,
    SentimentRequest,
    SentimentResponse,
    SessionIntentRequest,
)

router = APIRouter(tags=["tasks"], dependencies=PREDICT)


@router.post("/v1/purchase-intent", response_model=IntentPrediction, responses=WITH_404)
async def purchase_intent(body: PurchaseIntentRequest, api: Api, svc: Service) -> IntentPrediction:
    """P(the user buys the item within `horizon_hours`): a logistic baseline on funnel
    features blended with the model's yes/no probability, and a reason citing the user's events.
    `scorer` picks another source: the baseline, the fine-tuned BERT encoder, the model alone,
    or the blend trained on validation users (422 naming `scorer` when no encoder is trained).

    Model down, slow or loading: 200 with the baseline probability and a template reason,
    `meta.degraded=true` and the reason."""
    when = parse_as_of(body.as_of)
    await svc.check_user(body.dataset, body.user_id)
    pred = await svc.intent(body.dataset, body.user_id, body.item_id, as_of=when, horizon_hours=body.horizon_hours,
                            use_model=body.use_llm, scorer=body.scorer)
    api.count("/v1/purchase-intent", pred)
    return pred


@router.post("/v1/click", response_model=ClickPrediction, responses=WITH_404)
async def click(body: ClickRequest, api: Api, svc: Service) -> ClickPrediction:
    """P(the user views or clicks the item within the horizon), from the dataset's fine-tuned
    click encoder (`shoplens train --task click --model bert`): the funnel baseline, the encoder,
    or their blend chosen on validation users. No generative model; milliseconds. 422 naming
    `dataset` when no click encoder is trained, `horizon_hours` for another horizon."""
    when = parse_as_of(body.as_of)
    await svc.check_user(body.dataset, body.user_id)
    pred = await svc.click(body.dataset, body.user_id, body.item_id, as_of=when, horizon_hours=body.horizon_hours,
                           scorer=body.scorer)
    api.count("/v1/click", pred)
    return pred


@router.post("/v1/session-intent", response_model=SessionIntentPrediction, responses=WITH_404)
async def session_intent(body: SessionIntentRequest, api: Api, svc: Service) -> SessionIntentPrediction:
    """P(the user buys anything later in the current session, or within `horizon_hours`): a
    logistic baseline on session features blended with the model's yes/no probability, and a
    reason citing the session's events. A user with no events before `as_of` gets the labelled
    base rate (`cold_start`).

    Model down, slow or loading: 200 with the baseline probability and a template reason,
    `meta.degraded=true` and the reason."""
    when = parse_as_of(body.as_of)
    await svc.check_user(body.dataset, body.user_id)
    pred = await svc.session_intent(body.dataset, body.user_id, as_of=when, horizon_hours=body.horizon_hours,
                                    use_model=body.use_llm)
    api.count("/v1/session-intent", pred)
    return pred


@router.post("/v1/churn", response_model=ChurnPrediction, responses=WITH_404)
async def churn(body: ChurnRequest, api: Api, svc: Service) -> ChurnPrediction:
    """P(no purchase within `horizon_days` after `as_of`): an RFM logistic baseline blended
    with the model, drivers, a retention action and a cited reason.

    Model down, slow or loading: 200 with the baseline probability and a rule-based action,
    `meta.degraded=true` and the reason."""
    await svc.check_user(body.dataset, body.user_id)
    pred = await svc.churn(body.dataset, body.user_id, as_of=parse_as_of(body.as_of), horizon_days=body.horizon_days,
                           use_model=body.use_llm)
    api.count("/v1/churn", pred)
    return pred


@router.post("/v1/profile", response_model=UserProfile, responses={**WITH_404, **R503_MODEL})
async def profile(body: ProfileRequest, api: Api, svc: Service) -> UserProfile:
    """Computed attributes (interests, style, price level, rhythm, lifecycle) plus a
    model-written summary whose claims cite the user's events.

    Model down, slow or loading: 503 with Retry-After (the summary is the model's job);
    send `use_llm=false` for the computed profile with a `[template]` summary."""
    when = parse_as_of(body.as_of)
    await svc.check_user(body.dataset, body.user_id)
    pred = await svc.profile(body.dataset, body.user_id, as_of=when, use_model=body.use_llm, strict=True)
    api.count("/v1/profile", pred)
    return pred


@router.post("/v1/sentiment", response_model=SentimentResponse, responses=ERROR_RESPONSES)
async def sentiment(body: SentimentRequest, api: Api, svc: Service) -> SentimentResponse:
    """Polarity (and optionally aspects) of each review text, in request order. Text is
    cleaned (HTML, personal data, instruction-like sentences) before the model sees it.

    Model down, slow or loading: 200, each text judged by the lexicon baseline
    (`source="lexicon"`, its `meta.degraded=true`), and the batch `meta.degraded=true`."""
    s = api.settings
    if len(body.texts) > s.max_sentiment_texts:
        raise ApiError(413, f"{len(body.texts)} texts exceed the limit of {s.max_sentiment_texts} per request "
                       "(SHOPLENS_MAX_SENTIMENT_TEXTS)", code="too_many_texts", param="texts")
    for i, t in enumerate(body.texts):
        if len(t) > s.max_text_chars:
            raise ApiError(413, f"text of {len(t)} characters exceeds {s.max_text_chars} "
                           "(SHOPLENS_MAX_TEXT_CHARS)", code="text_too_long", param=f"texts[{i}]")
    batch = await svc.sentiment(body.texts, aspects=body.aspects, use_model=body.use_llm)
    api.count("/v1/sentiment", batch)
    return SentimentResponse(results=batch.results, meta=batch.meta)


@router.post("/v1/audience", response_model=AudiencePrediction, responses=ERROR_RESPONSES)
async def audience(body: AudienceRequest, api: Api, svc: Service) -> AudiencePrediction:
    """The `n` users most likely to buy `item_id` (or to answer `campaign_text`), ranked by
    retrieval fusion; the model scores and explains the top few. User ids are as stored
    (pseudonymised when SHOPLENS_PSEUDONYMISE_KEY is set). `predicted`: also rank by the
    fine-tuned click or purchase encoder (422 naming `predicted` when none is trained).

    Model down, slow or loading: 200 ranked by retrieval alone with template reasons,
    `meta.degraded=true` and the reason."""
    pred = await svc.audience(body.dataset, item_id=body.item_id, campaign_text=body.campaign_text, n=body.n,
                              use_model=body.use_llm, predicted=body.predicted)
    api.count("/v1/audience", pred)
    return pred
