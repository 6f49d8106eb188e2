"""The task kit every prediction task shares: evidence, meta, probabilities, the baseline, and
one "ask the model or degrade" helper.

* Evidence: `Cited` (base of every model answer that cites event refs), `evidence_from_refs`;
  with `Probability`, `parse_probability` and `normalise_label` they live beside the schemas in
  `agent.domain.predictions.common` and are re-exported here.
* Envelope: `make_meta` (the `Meta` every answer carries).
* Probabilities: `Probability` (bounded, '87%' accepted), `yes_probability` / `ask_yes_no`
  (the verbalizer over yes/no tokens: a probability read from token log-probabilities, never a
  number the model writes), `LogisticBaseline` (the fitted scikit-learn baseline as plain
  numbers) and `Blend` (baseline and model combined in logit space).
* `ask_or_degrade`: run one model step; a model failure becomes a labelled degradation in the
  call trace instead of an exception, so each task falls back to its baseline or template.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from agent.domain.errors import ModelUnavailableError, OutputValidationError
from agent.domain.predictions import Meta
from agent.domain.predictions.common import (  # the evidence and probability rules live with the schemas
    Cited,
    Probability,
    check_refs,
    evidence_from_refs,
    normalise_label,
    normalise_refs,
    parse_probability,
)
from agent.llm.base import ChatModel, Message
from agent.llm.structured import CallTrace

__all__ = [
    "Blend", "Cited", "LogisticBaseline", "Probability", "ask_or_degrade", "ask_yes_no", "check_refs",
    "evidence_from_refs", "logit", "make_meta", "normalise_label", "normalise_refs", "parse_probability",
    "sigmoid", "yes_probability",
]
log = logging.getLogger(__name__)
T = TypeVar("T")


def make_meta(task: str, model: ChatModel | None, trace: CallTrace, prompts: list[str], t0: float,
              model_sha256: str | None = None, notes: list[str] | None = None) -> Meta:
    return Meta(
        task=task, prompt_versions=prompts, model_id=getattr(model, "model_id", None),
        model_sha256=model_sha256, attempts=trace.attempts, salvaged=trace.salvaged,
        prompt_tokens=trace.usage.prompt_tokens,
        completion_tokens=trace.usage.completion_tokens, latency_s=round(time.perf_counter() - t0, 4),
        model_latency_s=round(trace.model_latency_s, 4), degraded=bool(trace.degraded),
        degraded_reason="; ".join(trace.degraded) or None, notes=trace.notes + (notes or []),
        verification=trace.verification,
    )


# ---- probabilities: the verbalizer, the baseline, the blend -------------------------


def yes_probability(top: Mapping[str, float]) -> tuple[float | None, float]:
    """(P(yes) renormalised over yes/no tokens, or None when neither is among the top
    log-probabilities; the probability mass on yes/no). "Yes", " yes" count as yes."""
    py = sum(math.exp(lp) for t, lp in top.items() if t.strip().lower() in ("yes", "y"))
    pn = sum(math.exp(lp) for t, lp in top.items() if t.strip().lower() in ("no", "n"))
    if py + pn <= 0:
        return None, 0.0
    return py / (py + pn), py + pn


async def ask_yes_no(model: ChatModel, messages: list[Message], trace: CallTrace) -> float | None:
    """One 1-token call; the verbalizer probability of "yes" (None when unusable)."""
    comp = await model.complete(messages, max_tokens=1, top_logprobs=10)
    trace.attempts += 1
    trace.usage.add(comp.usage)
    trace.model_latency_s += comp.latency_s
    trace.raw_outputs.append(json.dumps({"text": comp.text, "top": comp.top_logprobs[:1]}))
    top = comp.top_logprobs[0] if comp.top_logprobs else {comp.text: 0.0}
    p, mass = yes_probability(top)
    if p is None:
        trace.notes.append(f"verbalizer: no yes/no token in the answer ({comp.text!r})")
    elif mass < 0.5:
        trace.notes.append(f"verbalizer: only {mass:.0%} probability on yes/no")
    return p


def logit(p: float, eps: float = 1e-4) -> float:
    p = min(1 - eps, max(eps, p))
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@dataclass
class Blend:
    """final = sigmoid(a * logit(p_baseline) + b * logit(p_model) + c); default: the baseline
    plus half the model's log-odds. Fitted by cross-fitting in eval/tasks_eval.py."""

    a: float = 1.0
    b: float = 0.5
    c: float = 0.0

    def __call__(self, p_base: float, p_model: float | None) -> float:
        return p_base if p_model is None else sigmoid(self.a * logit(p_base) + self.b * logit(p_model) + self.c)


@dataclass
class LogisticBaseline:
    """A fitted logistic regression as plain numbers: coefficients per named feature."""

    features: list[str]
    coef: list[float]
    intercept: float
    base_rate: float  # the positive rate it was trained on (the cold-start answer)
    trained_on: str = ""
    blend: Blend | None = None

    def predict(self, x: Mapping[str, float]) -> float:
        return sigmoid(self.intercept + sum(c * float(x[f]) for f, c in zip(self.features, self.coef, strict=True)))

    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, float]], labels: Sequence[int], features: list[str],
            trained_on: str = "") -> LogisticBaseline:
        from sklearn.linear_model import LogisticRegression  # deferred: heavy import

        X = [[float(r[f]) for f in features] for r in rows]
        lr = LogisticRegression(max_iter=2000, C=1.0).fit(X, list(labels))
        return cls(features, [round(float(c), 6) for c in lr.coef_[0]], round(float(lr.intercept_[0]), 6),
                   round(sum(labels) / max(1, len(labels)), 6), trained_on)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> LogisticBaseline:
        d = json.loads(path.read_text())
        blend = d.pop("blend", None)
        return cls(**d, blend=Blend(**blend) if blend else None)


async def ask_or_degrade(model: ChatModel | None, step: Callable[[ChatModel], Awaitable[T]],
                         trace: CallTrace, *, what: str, fallback: str) -> T | None:
    """Run `step(model)`; on a model failure record a labelled degradation and return None.

    Args:
        model: the model, or None when there is none (disabled, down, loading).
        step: the model step (one or more calls through `trace`).
        what: what the step produces, for the degradation note (e.g. "explanation").
        fallback: what the caller answers instead (e.g. "baseline probability, template reason").

    Returns:
        The step's result, or None (then ``trace.degraded`` says why and what was used instead).
    """
    if model is None:
        trace.degraded.append(f"no model configured: {fallback}")
        return None
    try:
        return await step(model)
    except ModelUnavailableError as e:
        log.warning("model unavailable for %s: %s", what, e)
        trace.degraded.append(f"model unavailable for {what} ({e}); {fallback}")
    except OutputValidationError as e:
        trace.degraded.append(f"{what} invalid after {e.attempts} attempts: {e.errors[:2]}; {fallback}")
    return None
