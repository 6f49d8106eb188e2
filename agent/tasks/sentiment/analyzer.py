"""The sentiment analyzer: polarity from a verbalizer, aspects in the same call, a labelled fallback.

Polarity and confidence come from the first answer token's top log-probabilities: the prompt
asks for one word, ``positive``/``negative``/``neutral``, each a single Qwen2.5 token, and the
softmax over those three tokens at the first answer position is the distribution (a
verbalizer, as in `agent.llm.verbalizer`).

With `SentimentConfig.joint` (``--one-call``) and aspects on, the same call goes on writing
(``sentiment_joint.v2``): after the label, one ``term | label`` line per judged aspect, capped at
`SentimentConfig.joint_max_tokens`. Each term must occur in the review (an invented one is
dropped and said in ``meta.notes``); its span is the review's clause that holds it, found by code,
so it is always an exact substring. One call per review, a constant system prefix the server
reuses (issue 20). The default stays two calls (polarity pass + a schema-constrained JSON aspects
call with one repair): the one-call label is less accurate (docs/sentiment_results.md).

With a `DemoPool` (a shop's labelled reviews, `agent.tasks.sentiment.fewshot`), the polarity call
is few-shot (``sentiment_fewshot.v1``): the review's nearest labelled reviews of each label come
before it. `SentimentConfig.label_offset` (fitted on a handful of the shop's labels) moves the
decision threshold. Both are said in ``meta.notes`` and are part of a stored score's key.

Review text is untrusted: HTML is stripped, entities unescaped, e-mail addresses and phone
numbers masked, and the text is put between fixed delimiters as data. When the model is down
the answer comes from a small lexicon and says so (`meta.degraded`); nothing is invented.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from agent.domain.predictions import (
    POLARITIES,
    AspectsAnswer,
    AspectSentiment,
    Meta,
    SentimentFailure,
    SentimentResult,
    aspects_json_schema,
    normalise_polarity,
)
from agent.domain.text import detect_language
from agent.llm.base import ChatModel, Completion, ModelUnavailableError, OutputValidationError
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.llm.verbalizer import label_distribution
from agent.tasks.sentiment.fewshot import DEMO_CHARS, Demo, DemoPool, shifted
from agent.tasks.sentiment.lexicon import lexicon_probabilities
from agent.tasks.sentiment.text import MAX_CHARS, prepare_text
from retrieval.embedder import Embedder


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


_CLAUSE = re.compile(r"[^,.;:!?，。；：！？、\n]+")
_ASPECT_LINE = re.compile(r"^\s*(?:[-*•]\s*|\d+[.)]\s*)?(?P<term>.+?)\s*[|｜]\s*(?P<label>[^|｜]+?)\s*$")


def clause_with(text: str, term: str) -> str | None:
    """The first clause of `text` (split at , . ; : ! ? and their CJK forms) that holds `term`
    (case-insensitive), stripped: an exact substring of `text`. None when no clause holds it
    (e.g. a term spanning punctuation); then the term itself is the span."""
    low = term.lower()
    for m in _CLAUSE.finditer(text):
        if low in m.group().lower():
            return m.group().strip()
    return None


MAX_TERM_WORDS = 5  # an aspect term is a noun phrase (SemEval-2014's are 1-4 words); longer is a clause


def parse_aspect_lines(answer: str, text: str, max_aspects: int = 3) -> tuple[list[AspectSentiment], list[str]]:
    """The aspects of a joint answer: lines 2.. of `answer` as ``term | label``.

    A line is kept when its label is a polarity, its term occurs in `text` (case-insensitive,
    quotes stripped) and has at most `MAX_TERM_WORDS` words; duplicates (same term, any case)
    keep the first. Nothing is dropped
    silently: every rejected line gets a note.

    Args:
        answer: the model's text (line 1, the overall label, is skipped unless it holds a ``|``).
        text: the cleaned review the model saw.
        max_aspects: keep at most this many.

    Returns:
        (aspects in the model's order, notes for the lines not kept).
    """
    lines = [ln for ln in answer.splitlines() if ln.strip()]
    if lines and "|" not in lines[0] and "｜" not in lines[0]:
        lines = lines[1:]
    out: list[AspectSentiment] = []
    notes: list[str] = []
    seen: set[str] = set()
    low_text = text.lower()
    for ln in lines:
        m = _ASPECT_LINE.match(ln)
        if m is None:
            notes.append(f"aspect line {ln.strip()[:60]!r} is not 'term | label': dropped")
            continue
        term = m.group("term").strip().strip("\"'“”‘’「」")
        label = m.group("label").strip().lower().rstrip(".。")
        with contextlib.suppress(ValueError):  # 'Positive', 'neg', '负面' -> the closed label
            label = str(normalise_polarity(label))
        if label not in POLARITIES:
            notes.append(f"aspect {term[:40]!r}: label {label[:20]!r} is not positive/negative/neutral: dropped")
        elif not term or term.lower() not in low_text:
            notes.append(f"aspect {term[:40]!r} does not occur in the review: dropped")
        elif len(term.split()) > MAX_TERM_WORDS:
            notes.append(f"aspect {term[:40]!r} is a clause, not a term (> {MAX_TERM_WORDS} words): dropped")
        elif term.lower() in seen:
            continue
        elif len(out) >= max_aspects:
            notes.append(f"more than {max_aspects} aspects: {term[:40]!r} and later ones dropped")
            break
        else:
            seen.add(term.lower())
            i = low_text.index(term.lower())
            written = text[i:i + len(term)]  # the review's own casing
            out.append(AspectSentiment.model_validate(
                {"aspect": written, "polarity": label, "span": clause_with(text, written) or written},
                context={"text": text}))
    return out, notes


@dataclass
class SentimentConfig:
    """Everything that changes an answer (recorded by the eval harness)."""

    prompt: str = "sentiment.v1"
    # Aspects in the polarity call (sentiment_joint.v2, `--one-call`): 7x the reviews per minute,
    # but measured at n=150 its label is less accurate (amazon_cells 91.3 vs 94.0; 3-way 60.7 vs
    # 93.3: it answers "neutral" for mixed reviews), so the served default stays two calls.
    joint: bool = False
    joint_prompt: str = "sentiment_joint.v2"  # v2: a term is a short noun phrase, never the product
    joint_max_tokens: int = 40  # hard cap: label + 3 aspect lines of ~6-10 tokens
    joint_max_aspects: int = 3
    aspects_prompt: str = "sentiment_aspects.v2"  # v2: terms as written (v1 answered "quality")
    top_logprobs: int = 20  # vLLM's default cap; the three labels are always near the top
    min_label_mass: float = 0.01  # below this the model did not answer with a label -> fallback
    max_attempts: int = 2  # aspects: one call + one repair
    max_aspects: int = 5
    filter_instructions: bool = True  # drop instruction-like sentences from reviews (injection defence)
    fewshot_prompt: str = "sentiment_fewshot.v1"  # used when the analyzer has a DemoPool (issue 16)
    fewshot_k: int = 4  # demonstrations per review: the 2 nearest of each label on a binary pool
    label_offset: float = 0.0  # the shop's fitted decision offset on log p(pos) - log p(neg) (fewshot.fit_offset)


_FEWSHOT_FIELDS = ("fewshot_prompt", "fewshot_k", "label_offset")


class SentimentAnalyzer:
    """Judge reviews with a `ChatModel` (or, with ``model=None``, the lexicon, labelled degraded).

    Args:
        model: the chat model; None when it is known to be unavailable.
        model_sha256: recorded in `meta` (the packaged GGUF's hash).
        unavailable_reason: why `model` is None, shown in `meta.degraded_reason`.
    """

    def __init__(self, model: ChatModel | None, *, model_sha256: str | None = None,
                 config: SentimentConfig | None = None, unavailable_reason: str | None = None,
                 demos: DemoPool | None = None, embedder: Embedder | None = None):
        if demos is not None and (embedder is None or embedder.name != demos.embedder_name):
            raise ValueError(f"a demonstration pool embedded with {demos.embedder_name!r} needs that embedder "
                             f"to search it (got {getattr(embedder, 'name', None)!r})")
        self.model = model
        self.model_sha256 = model_sha256
        self.config = config or SentimentConfig()
        self.down_reason = unavailable_reason if model is None else None
        self.tpl = load_prompt(self.config.prompt)
        self.aspects_tpl = load_prompt(self.config.aspects_prompt)
        self.joint_tpl = load_prompt(self.config.joint_prompt)
        self.fewshot_tpl = load_prompt(self.config.fewshot_prompt)
        self.demos, self.embedder = demos, embedder
        # demonstrations are picked from every label the pool holds; the prompt always offers
        # negative and positive (a shop that labelled only its good reviews must not be told
        # "positive" is the only answer), and neutral when the pool uses it
        self.demo_labels = ([lab for lab in ("negative", "positive", "neutral") if any(d.label == lab for d in demos.demos)]
                            if demos is not None else [])
        self.prompt_labels = ["negative", "positive"] + (["neutral"] if "neutral" in self.demo_labels else [])
        if self.config.label_offset and not math.isfinite(self.config.label_offset):
            raise ValueError(f"label_offset must be a finite number, got {self.config.label_offset}")

    def score_key(self, raw_text: str, aspects: bool) -> str:
        """A stored score's key: sha256 of the raw text and everything that changes its answer
        (model sha256 and id, prompts and their shas, the config, aspects on/off). A new prompt
        version or model re-scores; an unchanged review never is (issue 20's resume)."""
        fewshot = self.demos is not None or self.config.label_offset != 0.0
        tpls = {t.ref: t.sha256 for t in (self.tpl, self.aspects_tpl, self.joint_tpl)}
        config = asdict(self.config)
        extra: dict[str, object] = {}
        if fewshot:  # keys of zero-shot scores stay what they were before few-shot existed
            tpls[self.fewshot_tpl.ref] = self.fewshot_tpl.sha256
            extra["demos"] = self.demos.sha256 if self.demos is not None else None
        else:
            config = {k: v for k, v in config.items() if k not in _FEWSHOT_FIELDS}
        ident = json.dumps({"model": self.model_sha256, "model_id": self.model.model_id if self.model else None,
                            "prompts": tpls, "config": config, "aspects": aspects, **extra}, sort_keys=True)
        return hashlib.sha256(f"{ident}\x1e{raw_text}".encode()).hexdigest()

    def messages(self, text: str, aspect: str | None = None, demos: Sequence[Demo] | None = None,
                 labels: Sequence[str] | None = None) -> list[dict[str, str]]:
        """The rendered polarity prompt for already-cleaned `text`: few-shot (`fewshot_prompt`)
        when `demos` are given (overall polarity only), else `prompt`."""
        if demos:
            if aspect is not None:
                raise ValueError("demonstrations are for overall polarity, not for one aspect")
            # cleaned again here, whatever built the pool: no markup, personal data or instruction reaches a prompt
            shown = [{"text": prepare_text(d.text, DEMO_CHARS, filter_instructions=self.config.filter_instructions)[0],
                      "label": d.label} for d in demos]
            return render(self.fewshot_tpl, text=text, demos=shown, labels=list(labels or ("negative", "positive")))
        return render(self.tpl, text=text, aspect=aspect)

    def demos_for(self, text: str, *, exclude_domain: str | None = None) -> list[Demo]:
        """The pool's demonstrations for already-cleaned `text` ([] without a pool): the
        `fewshot_k` nearest, balanced by label, never `text` itself (`DemoPool.select`)."""
        if self.demos is None or self.embedder is None or self.config.fewshot_k <= 0:
            return []
        vec = self.embedder.embed([text])[0]
        return self.demos.select(vec, self.config.fewshot_k, labels=self.demo_labels,
                                 exclude_domain=exclude_domain, exclude_text=text)

    async def verbalize(self, text: str, aspect: str | None = None, demos: Sequence[Demo] | None = None) -> Verbalized:
        """One forward pass on already-cleaned `text`: label probabilities from the first token
        (after `demos`, when given).

        Raises:
            ModelUnavailableError: from the model (or when there is none).
        """
        if self.model is None:
            raise ModelUnavailableError(self.down_reason or "no model configured")
        comp = await self.model.complete(self.messages(text, aspect, demos, self.prompt_labels or None), max_tokens=1,
                                         top_logprobs=self.config.top_logprobs)
        top = comp.top_logprobs[0] if comp.top_logprobs else {comp.text: 0.0}
        probs, mass = verbalizer_probabilities(top)
        return Verbalized(probabilities=probs, label_mass=mass, completion=comp, top=top)

    async def verbalize_joint(self, text: str) -> Verbalized:
        """One call on already-cleaned `text`: the label's probabilities from the first token
        and, in ``completion.text``, the aspect lines after it (parse with `parse_aspect_lines`).

        Raises:
            ModelUnavailableError: from the model (or when there is none).
        """
        if self.model is None:
            raise ModelUnavailableError(self.down_reason or "no model configured")
        comp = await self.model.complete(render(self.joint_tpl, text=text), max_tokens=self.config.joint_max_tokens,
                                         top_logprobs=self.config.top_logprobs)
        top = comp.top_logprobs[0] if comp.top_logprobs else {(comp.text.split() or [""])[0]: 0.0}
        probs, mass = verbalizer_probabilities(top)
        return Verbalized(probabilities=probs, label_mass=mass, completion=comp, top=top)

    async def analyze(self, raw_text: str, *, aspects: bool = True, aspect: str | None = None) -> SentimentResult:
        """Polarity (+ aspects) of one review.

        Args:
            raw_text: the review as received (HTML, entities and personal data are cleaned here).
            aspects: also extract aspect-level sentiment (in the same call with
                `SentimentConfig.joint`, else one more schema-constrained call).
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
        joint = aspects and aspect is None and self.config.joint
        model_up = self.model is not None and self.down_reason is None
        demos = self.demos_for(text) if aspect is None and not joint and model_up else []
        tpl = self.joint_tpl if joint else self.fewshot_tpl if demos else self.tpl
        meta = Meta(task="sentiment", prompt_versions=[tpl.ref])
        if demos and self.demos is not None:
            meta.notes.append(f"few-shot: {len(demos)} labelled reviews from the demonstration pool "
                              f"{self.demos.sha256} (nearest by {self.demos.embedder_name})")
        if n_removed:
            meta.notes.append(f"{n_removed} instruction-like sentence(s) removed from the review (prompt injection)")
        if len(raw_text) > MAX_CHARS:
            meta.notes.append(f"text cut to {MAX_CHARS} characters")
        probs: dict[str, float] | None = None
        joint_answer: Verbalized | None = None
        if self.model is not None and model_up:
            meta.model_id, meta.model_sha256 = self.model.model_id, self.model_sha256
            try:
                v = await (self.verbalize_joint(text) if joint else self.verbalize(text, aspect, demos))
                trace.attempts += 1
                trace.usage.add(v.completion.usage)
                trace.model_latency_s += v.completion.latency_s
                trace.raw_outputs.append(v.completion.text)
                if v.label_mass >= self.config.min_label_mass:
                    probs = v.probabilities
                    joint_answer = v if joint else None
                else:
                    meta.degraded_reason = (f"model answered {v.completion.text!r}, not a label (label "
                                            f"mass {v.label_mass:.3f}); answered by the lexicon baseline")
            except ModelUnavailableError as e:
                self.down_reason = f"model unavailable: {e}"
        source: Literal["model", "lexicon"] = "model"
        if probs is not None and self.config.label_offset and aspect is None:
            probs = shifted(probs, self.config.label_offset)
            meta.notes.append(f"decision offset {self.config.label_offset:+.2f} on log p(positive) - log p(negative), "
                              "fitted on the shop's labelled reviews")
        if probs is None:
            source = "lexicon"
            probs = lexicon_probabilities(text)
            meta.degraded = True
            meta.degraded_reason = meta.degraded_reason or (
                f"{self.down_reason or 'no model configured'}; answered by the lexicon baseline")
        polarity = max(POLARITIES, key=lambda k: probs[k])
        result_aspects: list[AspectSentiment] = []
        aspects_source: Literal["model", "not_requested", "unavailable"] = "not_requested"
        if joint_answer is not None:
            result_aspects, dropped = parse_aspect_lines(joint_answer.completion.text, text,
                                                         self.config.joint_max_aspects)
            aspects_source = "model"
            meta.notes.extend(dropped)
            if joint_answer.completion.finish_reason == "length":
                meta.notes.append(f"answer reached the {self.config.joint_max_tokens}-token cap; a cut last "
                                  "aspect line is dropped")
        elif aspects and aspect is None:
            aspects_source = "unavailable"
            if joint or source != "model" or self.down_reason is not None or self.model is None:
                meta.notes.append("aspects need the model; none extracted")
            else:
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
        meta.attempts, meta.salvaged = trace.attempts, trace.salvaged
        meta.prompt_tokens, meta.completion_tokens = trace.usage.prompt_tokens, trace.usage.completion_tokens
        meta.model_latency_s = trace.model_latency_s
        meta.latency_s = time.perf_counter() - t0
        if trace.raw_outputs and not joint:
            meta.notes.append(f"raw first token: {trace.raw_outputs[0]!r}")
        return SentimentResult(
            polarity=polarity, confidence=round(probs[polarity], 6),
            probabilities={k: round(v, 6) for k, v in probs.items()}, language=lang,
            aspects=result_aspects, aspects_source=aspects_source, target_aspect=aspect,
            source=source, text=text, meta=meta)

    async def analyze_batch(
        self, texts: Sequence[object], *, aspects: bool = False,
        on_done: Callable[[int, SentimentResult | SentimentFailure], None] | None = None,
        concurrency: int = 1, indices: Sequence[int] | None = None,
    ) -> list[SentimentResult | SentimentFailure]:
        """Judge many reviews; a bad record becomes a `SentimentFailure`, never an abort.

        Once the model is found unavailable the rest of the batch uses the labelled lexicon
        fallback without waiting on the dead server again.

        Args:
            on_done: called with (index, result) as each review is judged (any order when
                `concurrency` > 1).
            concurrency: requests in flight at once (1 on the embedded 2-core server; a vLLM
                server batches many).
            indices: each text's index as reported in `on_done` and `SentimentFailure.index`
                (default 0..n-1; a caller scoring only the unscored rows of a file passes theirs).

        Returns:
            One result per text, in the order of `texts`.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        idx = list(indices) if indices is not None else list(range(len(texts)))
        if len(idx) != len(texts):
            raise ValueError(f"indices has {len(idx)} entries for {len(texts)} texts")
        out: list[SentimentResult | SentimentFailure | None] = [None] * len(texts)
        gate = asyncio.Semaphore(concurrency)

        async def one(pos: int) -> None:
            t = texts[pos]
            r: SentimentResult | SentimentFailure
            async with gate:
                try:
                    if t is None or (isinstance(t, float) and math.isnan(t)):
                        raise ValueError("review text is missing")
                    r = await self.analyze(t if isinstance(t, str) else str(t), aspects=aspects)
                except (ValueError, OutputValidationError) as e:
                    r = SentimentFailure(index=idx[pos], error=str(e))
            out[pos] = r
            if on_done is not None:
                on_done(idx[pos], r)

        if concurrency == 1:
            for pos in range(len(texts)):
                await one(pos)
        else:
            await asyncio.gather(*(one(pos) for pos in range(len(texts))))
        return [r for r in out if r is not None]
