"""The sentiment analyzer: polarity from a verbalizer, aspects from one structured call, a labelled fallback.

Polarity and confidence come from ONE forward pass (``max_tokens=1``, top log-probabilities):
the prompt asks for one word, ``positive``/``negative``/``neutral``, each a single Qwen2.5
token, and the softmax over those three tokens at the first answer position is the
distribution (a verbalizer, as in `agent.llm.verbalizer`). Aspect-level sentiment (aspect term,
polarity, exact span) comes from one schema-constrained `structured_call`, with the cleaned
review as validation context so every span must be a real substring.

Review text is untrusted: HTML is stripped, entities unescaped, e-mail addresses and phone
numbers masked, and the text is put between fixed delimiters as data. When the model is down
the answer comes from a small lexicon and says so (`meta.degraded`); nothing is invented.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.domain.predictions import (
    POLARITIES,
    AspectsAnswer,
    AspectSentiment,
    Meta,
    SentimentFailure,
    SentimentResult,
    aspects_json_schema,
)
from agent.domain.text import detect_language
from agent.llm.base import ChatModel, Completion, ModelUnavailableError, OutputValidationError
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.llm.verbalizer import label_distribution
from agent.tasks.sentiment.lexicon import lexicon_probabilities
from agent.tasks.sentiment.text import MAX_CHARS, prepare_text


def verbalizer_probabilities(top: dict[str, float], labels: Sequence[str] = POLARITIES) -> tuple[dict[str, float], float]:
    """Label probabilities from one position's top log-probabilities.

    Token variants ('Positive', ' positive') are merged into the lowercase label by
    log-sum-exp before the softmax over labels (`agent.llm.verbalizer.label_distribution`).

    Returns:
        (label -> probability summing to 1, raw probability mass the model put on the labels).
    """
    merged: dict[str, float] = {}
    for tok, lp in top.items():
        key = tok.strip().lower()
        if key in labels:
            merged[key] = float(lp) if key not in merged else float(
                max(merged[key], lp) + math.log1p(math.exp(-abs(merged[key] - lp))))
    probs, mass = label_distribution(merged, list(labels))
    return dict(zip(labels, probs, strict=True)), mass


@dataclass
class Verbalized:
    """One verbalizer pass: label probabilities, the mass on labels (0..1) and the raw answer."""

    probabilities: dict[str, float]
    label_mass: float
    completion: Completion
    top: dict[str, float]


@dataclass
class SentimentConfig:
    """Everything that changes an answer (recorded by the eval harness)."""

    prompt: str = "sentiment.v1"
    aspects_prompt: str = "sentiment_aspects.v2"  # v2: terms as written (v1 answered "quality")
    top_logprobs: int = 20  # vLLM's default cap; the three labels are always near the top
    min_label_mass: float = 0.01  # below this the model did not answer with a label -> fallback
    max_attempts: int = 2  # aspects: one call + one repair
    max_aspects: int = 5
    filter_instructions: bool = True  # drop instruction-like sentences from reviews (injection defence)


class SentimentAnalyzer:
    """Judge reviews with a `ChatModel` (or, with ``model=None``, the lexicon, labelled degraded).

    Args:
        model: the chat model; None when it is known to be unavailable.
        model_sha256: recorded in `meta` (the packaged GGUF's hash).
        unavailable_reason: why `model` is None, shown in `meta.degraded_reason`.
    """

    def __init__(self, model: ChatModel | None, *, model_sha256: str | None = None,
                 config: SentimentConfig | None = None, unavailable_reason: str | None = None):
        self.model = model
        self.model_sha256 = model_sha256
        self.config = config or SentimentConfig()
        self.down_reason = unavailable_reason if model is None else None
        self.tpl = load_prompt(self.config.prompt)
        self.aspects_tpl = load_prompt(self.config.aspects_prompt)

    def messages(self, text: str, aspect: str | None = None) -> list[dict[str, str]]:
        """The rendered polarity prompt for already-cleaned `text`."""
        return render(self.tpl, text=text, aspect=aspect)

    async def verbalize(self, text: str, aspect: str | None = None) -> Verbalized:
        """One forward pass on already-cleaned `text`: label probabilities from the first token.

        Raises:
            ModelUnavailableError: from the model (or when there is none).
        """
        if self.model is None:
            raise ModelUnavailableError(self.down_reason or "no model configured")
        comp = await self.model.complete(self.messages(text, aspect), max_tokens=1,
                                         top_logprobs=self.config.top_logprobs)
        top = comp.top_logprobs[0] if comp.top_logprobs else {comp.text: 0.0}
        probs, mass = verbalizer_probabilities(top)
        return Verbalized(probabilities=probs, label_mass=mass, completion=comp, top=top)

    async def analyze(self, raw_text: str, *, aspects: bool = True, aspect: str | None = None) -> SentimentResult:
        """Polarity (+ aspects) of one review.

        Args:
            raw_text: the review as received (HTML, entities and personal data are cleaned here).
            aspects: also extract aspect-level sentiment (one more model call).
            aspect: judge the polarity toward this aspect term instead of overall.

        Raises:
            ValueError: empty text after cleaning (caller mistake).
        """
        t0 = time.perf_counter()
        if not isinstance(raw_text, str):
            raise ValueError(f"review text must be a string, got {type(raw_text).__name__}")
        text, n_removed = prepare_text(raw_text, filter_instructions=self.config.filter_instructions)
        if not text:
            raise ValueError("review text is empty after removing HTML and whitespace")
        lang = detect_language(text)
        trace = CallTrace()
        meta = Meta(task="sentiment", prompt_versions=[self.tpl.ref])
        if n_removed:
            meta.notes.append(f"{n_removed} instruction-like sentence(s) removed from the review (prompt injection)")
        if len(raw_text) > MAX_CHARS:
            meta.notes.append(f"text cut to {MAX_CHARS} characters")
        probs: dict[str, float] | None = None
        if self.model is not None and self.down_reason is None:
            meta.model_id, meta.model_sha256 = self.model.model_id, self.model_sha256
            try:
                v = await self.verbalize(text, aspect)
                trace.attempts += 1
                trace.usage.add(v.completion.usage)
                trace.model_latency_s += v.completion.latency_s
                trace.raw_outputs.append(v.completion.text)
                if v.label_mass >= self.config.min_label_mass:
                    probs = v.probabilities
                else:
                    meta.degraded_reason = (f"model answered {v.completion.text!r}, not a label (label "
                                            f"mass {v.label_mass:.3f}); answered by the lexicon baseline")
            except ModelUnavailableError as e:
                self.down_reason = f"model unavailable: {e}"
        source: Literal["model", "lexicon"] = "model"
        if probs is None:
            source = "lexicon"
            probs = lexicon_probabilities(text)
            meta.degraded = True
            meta.degraded_reason = meta.degraded_reason or (
                f"{self.down_reason or 'no model configured'}; answered by the lexicon baseline")
        polarity = max(POLARITIES, key=lambda k: probs[k])
        result_aspects: list[AspectSentiment] = []
        aspects_source: Literal["model", "not_requested", "unavailable"] = "not_requested"
        if aspects and aspect is None:
            aspects_source = "unavailable"
            if source == "model" and self.down_reason is None and self.model is not None:
                meta.prompt_versions.append(self.aspects_tpl.ref)
                try:
                    ans = await structured_call(
                        self.model, render(self.aspects_tpl, text=text, max_aspects=self.config.max_aspects),
                        AspectsAnswer, json_schema=aspects_json_schema(self.config.max_aspects),
                        context={"text": text}, max_attempts=self.config.max_attempts, trace=trace)
                    result_aspects, aspects_source = ans.aspects, "model"
                except OutputValidationError as e:
                    meta.notes.append(f"aspects unavailable: {e} ({'; '.join(e.errors[:3])})")
                except ModelUnavailableError as e:  # often a timeout of the longer JSON call: the
                    meta.notes.append(f"aspects unavailable: {e}")  # next polarity call re-checks the server
            else:
                meta.notes.append("aspects need the model; none extracted")
        meta.attempts, meta.salvaged = trace.attempts, trace.salvaged
        meta.prompt_tokens, meta.completion_tokens = trace.usage.prompt_tokens, trace.usage.completion_tokens
        meta.model_latency_s = trace.model_latency_s
        meta.latency_s = time.perf_counter() - t0
        if trace.raw_outputs:
            meta.notes.append(f"raw first token: {trace.raw_outputs[0]!r}")
        return SentimentResult(
            polarity=polarity, confidence=round(probs[polarity], 6),
            probabilities={k: round(v, 6) for k, v in probs.items()}, language=lang,
            aspects=result_aspects, aspects_source=aspects_source, target_aspect=aspect,
            source=source, text=text, meta=meta)

    async def analyze_batch(
        self, texts: Sequence[object], *, aspects: bool = False,
        on_done: Callable[[int, SentimentResult | SentimentFailure], None] | None = None,
    ) -> list[SentimentResult | SentimentFailure]:
        """Judge many reviews in order; a bad record becomes a `SentimentFailure`, never an abort.

        Once the model is found unavailable the rest of the batch uses the labelled lexicon
        fallback without waiting on the dead server again.
        """
        out: list[SentimentResult | SentimentFailure] = []
        for i, t in enumerate(texts):
            r: SentimentResult | SentimentFailure
            try:
                if t is None or (isinstance(t, float) and math.isnan(t)):
                    raise ValueError("review text is missing")
                r = await self.analyze(t if isinstance(t, str) else str(t), aspects=aspects)
            except (ValueError, OutputValidationError) as e:
                r = SentimentFailure(index=i, error=str(e))
            out.append(r)
            if on_done is not None:
                on_done(i, r)
        return out
