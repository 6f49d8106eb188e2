"""Every task's output schema: what ShopLens returns, and what the model is allowed to say.

One module per task (`next_item`, `intent` (per item and per session), `churn`, `profile`,
`audience`, `sentiment`) plus `common`: the `Meta` envelope, `Evidence`, and the validators the
model's answers share (`Cited`, `Probability`, `normalise_label`, ...). Pure pydantic: no model,
no I/O. The task modules (`agent.tasks.*`) import their schemas from here.
"""

from agent.domain.predictions.audience import AudiencePrediction, AudienceReason, TargetUser
from agent.domain.predictions.churn import Action, ChurnAnswer, ChurnPrediction, Driver, RiskBand
from agent.domain.predictions.common import (
    Cited,
    Evidence,
    Meta,
    ModelStep,
    Probability,
    check_refs,
    evidence_from_refs,
    normalise_label,
    normalise_refs,
    parse_probability,
)
from agent.domain.predictions.intent import (
    ClickPrediction,
    ClickScorer,
    IntentAnswer,
    IntentFields,
    IntentPrediction,
    IntentScorer,
    SessionIntentPrediction,
    Stage,
)
from agent.domain.predictions.next_item import (
    Explanation,
    ItemReason,
    NextItemPrediction,
    RankedItem,
    explanation_json_schema,
    explanation_schema_labels,
    why_cut_at,
    why_max_chars,
)
from agent.domain.predictions.profile import (
    SENSITIVE,
    SENSITIVE_KEYS,
    Attribute,
    Claim,
    Lifecycle,
    PriceBand,
    ProfileAnswer,
    ProfileClaim,
    UserProfile,
    sensitive_hits,
)
from agent.domain.predictions.sentiment import (
    POLARITIES,
    AspectsAnswer,
    AspectSentiment,
    Language,
    Polarity,
    SentimentFailure,
    SentimentResult,
    aspects_json_schema,
    normalise_polarity,
    normalise_probability,
)

__all__ = [
    "POLARITIES", "SENSITIVE", "SENSITIVE_KEYS", "Action", "AspectSentiment", "AspectsAnswer", "Attribute",
    "AudiencePrediction", "AudienceReason", "ChurnAnswer", "ClickPrediction", "ClickScorer", "IntentScorer", "ChurnPrediction", "Cited", "Claim", "Driver",
    "Evidence", "Explanation", "ModelStep", "IntentAnswer", "IntentFields", "IntentPrediction", "ItemReason", "Language",
    "Lifecycle", "Meta", "NextItemPrediction", "Polarity", "PriceBand", "Probability", "ProfileAnswer",
    "ProfileClaim", "RankedItem", "RiskBand", "SentimentFailure", "SentimentResult", "SessionIntentPrediction",
    "Stage", "TargetUser", "UserProfile", "aspects_json_schema", "check_refs", "evidence_from_refs",
    "explanation_json_schema", "explanation_schema_labels", "normalise_label", "normalise_polarity", "normalise_probability",
    "normalise_refs", "parse_probability", "sensitive_hits", "why_cut_at", "why_max_chars",
]
