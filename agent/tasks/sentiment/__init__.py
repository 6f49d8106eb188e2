"""Review sentiment: polarity from a verbalizer, aspects from one structured call, a labelled fallback.

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

import html
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.domain.pii import mask_pii
from agent.domain.predictions import (
    POLARITIES,
    AspectsAnswer,
    AspectSentiment,
    Language,
    Meta,
    Polarity,
    SentimentFailure,
    SentimentResult,
    aspects_json_schema,
    normalise_polarity,
    normalise_probability,
)
from agent.domain.text import detect_language
from agent.llm.base import ChatModel, Completion, ModelUnavailableError, OutputValidationError
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.llm.verbalizer import label_distribution

# ---- cleaning untrusted text -------------------------------------------------------------

_TAG = re.compile(r"<[^>]{0,500}>")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.I | re.S)
_DELIM = re.compile(r"</?\s*review\s*>", re.I)
_SPACES = re.compile(r"[ \t\u3000\xa0]+")
MAX_CHARS = 2000  # ~1.3k tokens of Chinese; longer reviews are cut (noted in meta)


def clean_text(raw: str, max_chars: int = MAX_CHARS) -> str:
    """Strip HTML (script/style bodies too), unescape entities, mask personal data
    (`agent.domain.pii.mask_pii`: e-mails, phone, card and IBAN numbers),
    remove anything that looks like our ``<review>`` delimiters, collapse spaces, cut to
    `max_chars`. Emoji and CJK punctuation are kept: they carry sentiment."""
    s = html.unescape(html.unescape(raw))  # double-escaped '&amp;lt;b&amp;gt;' is common in scraped data
    s = _SCRIPT.sub(" ", s)
    s = _TAG.sub(" ", s)
    s = _DELIM.sub(" ", s)
    s = mask_pii(s)
    s = "\n".join(_SPACES.sub(" ", line).strip() for line in s.splitlines())
    s = re.sub(r"\n{3,}", "\n\n", s).strip()
    return s[:max_chars]


# Instruction-like text inside a review (prompt injection). The 1.5B model copies a label word
# it is told to answer with (measured: 3 of 8 hostile reviews flipped with the prompt alone), so
# such sentences are removed before the model sees the text, and the removal is noted.
_LABEL_WORD = r"(positive|negative|neutral|正面|负面|中性|好评|差评)"
_INJECTION = re.compile("|".join([
    r"(ignore|disregard|forget)\b.{0,60}\b(instructions?|above|previous|prior|prompt|rules)",
    r"\b(system|assistant|developer)\s*:",
    r"(^|\bplease\s+)(answer|reply|respond|output|say|classify|label|return)\b.{0,40}" + _LABEL_WORD,
    r"\b(correct|true|real|final)\s+(label|answer|sentiment|classification)\b",
    r"\bnew\s+(task|instructions?)\b", r"#{2,}",
    r"忽略|无视|新指令|新的指令|系统[:：]|指令[:：]",
    r"(回答|输出|回复|标注|判断为|答案是|情感是|标签是)\s*[:：]?\s*" + _LABEL_WORD,
]), re.I)
_SENTENCE = re.compile(r"[^.!?。！？\n]*(?:[.!?。！？]+|\n|$)")


def remove_instructions(text: str) -> tuple[str, int]:
    """Drop the sentences of `text` that look like instructions to a model.

    Returns:
        (text with each such sentence replaced by "[instruction removed]", how many were removed).
    """
    out, n = [], 0
    for sent in _SENTENCE.findall(text):
        if sent.strip() and _INJECTION.search(sent.strip()):
            out.append(" [instruction removed]" + ("\n" if sent.endswith("\n") else " "))
            n += 1
        else:
            out.append(sent)
    return ("".join(out).strip(), n) if n else (text, 0)


def prepare_text(raw: str, max_chars: int = MAX_CHARS, *, filter_instructions: bool = True) -> tuple[str, int]:
    """`clean_text` then (by default) `remove_instructions`: what the model is shown."""
    text = clean_text(raw, max_chars)
    return remove_instructions(text) if filter_instructions else (text, 0)


# ---- the lexicon baseline (also the labelled fallback) -----------------------------------

_ZH_NEG = ["不好", "不满意", "不行", "不值", "不能用", "不推荐", "差", "失望", "退货", "退款", "垃圾", "太慢", "很慢",
           "坏了", "破", "假货", "问题", "后悔", "难用", "骗", "糟糕", "投诉", "不舒服", "异味", "掉色", "卡顿", "没用"]
_ZH_POS = ["好", "不错", "满意", "喜欢", "很快", "值得", "推荐", "舒服", "漂亮", "划算", "给力", "赞", "棒", "完美",
           "实惠", "方便", "清晰", "流畅", "超值", "好用", "挺好"]
_EN_NEG = {"bad", "poor", "terrible", "broken", "broke", "disappointed", "disappointing", "waste", "return",
           "returned", "worst", "awful", "useless", "junk", "hate", "refund", "defective", "horrible", "fail",
           "failed", "problem", "problems", "unhappy", "garbage", "cheaply", "flimsy", "slow", "rash", "burn"}
_EN_POS = {"good", "great", "excellent", "love", "loved", "loves", "perfect", "happy", "recommend", "nice", "best",
           "awesome", "amazing", "comfortable", "easy", "fast", "worth", "fantastic", "satisfied", "beautiful",
           "wonderful", "works", "soft", "favorite", "pleased", "impressed", "smooth", "well"}
_EN_NEGATORS = {"not", "no", "never", "don't", "dont", "doesn't", "didn't", "isn't", "wasn't", "won't", "can't",
                "cannot", "hardly", "without"}
_EMOJI_POS = set("😀😃😄😁😆😊🙂😍🥰😘👍💯❤💕💖✨🎉🌟⭐👌🙏😎🤩")
_EMOJI_NEG = set("😞😠😡🤬😢😭👎💩😤😒🙁☹😫😩🤮🤢💔")


def lexicon_probabilities(text: str) -> dict[str, float]:
    """A tiny zh/en/emoji lexicon with negation; returns heuristic label probabilities.

    Not calibrated: confidence grows with the vote margin (0.4 for a tie, at most 0.9).
    """
    pos = neg = 0
    rest = text
    for w in _ZH_NEG:
        neg += rest.count(w)
        rest = rest.replace(w, " ")
    for w in _ZH_POS:
        pos += rest.count(w)
    tokens = re.findall(r"[a-z']+", text.lower())
    for i, t in enumerate(tokens):
        negated = any(x in _EN_NEGATORS for x in tokens[max(0, i - 3):i])
        if t in _EN_POS:
            neg, pos = (neg + 1, pos) if negated else (neg, pos + 1)
        elif t in _EN_NEG:
            neg, pos = (neg, pos + 1) if negated else (neg + 1, pos)
    pos += sum(1 for c in text if c in _EMOJI_POS)
    neg += sum(1 for c in text if c in _EMOJI_NEG)
    margin = pos - neg
    if margin == 0:
        return {"negative": 0.3, "neutral": 0.4, "positive": 0.3}
    top = min(0.9, 0.55 + 0.1 * abs(margin))
    other = (1 - top) / 2
    label = "positive" if margin > 0 else "negative"
    return {p: (top if p == label else other) for p in POLARITIES}


def lexicon_polarity(text: str) -> Polarity:
    probs = lexicon_probabilities(text)
    return max(POLARITIES, key=lambda p: probs[p])  # type: ignore[return-value]


# ---- the model path -----------------------------------------------------------------------


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
        meta.attempts = trace.attempts
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
                r = await self.analyze(t if isinstance(t, str) else str(t), aspects=aspects)  # type: ignore[arg-type]
            except (ValueError, OutputValidationError) as e:
                r = SentimentFailure(index=i, error=str(e))
            out.append(r)
            if on_done is not None:
                on_done(i, r)
        return out


__all__ = [  # the schemas are re-exported from agent.domain.predictions.sentiment
    "POLARITIES", "Language", "Polarity", "aspects_json_schema",
    "AspectSentiment", "AspectsAnswer", "SentimentAnalyzer", "SentimentConfig",
    "SentimentFailure", "SentimentResult", "clean_text", "detect_language", "lexicon_polarity",
    "lexicon_probabilities", "normalise_polarity", "normalise_probability", "prepare_text", "remove_instructions", "verbalizer_probabilities",
]
