"""LLM ranking that cannot hallucinate: a verbalizer over letter-labelled candidates.

The model sees the candidates labelled A, B, C, ... and we read the log-probabilities of the
label tokens at the first answer position (LlamaRec, Yue et al. 2023, arXiv 2311.02089). The
candidate order is permuted a few times and the per-item probabilities averaged, to cancel
position bias (LLMRank, Hou et al., ECIR 2024, arXiv 2305.08845). Only candidate ids can come
out, always all of them.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.llm.base import ChatModel, Usage
from agent.llm.prompting import PromptTemplate, render

LABELS = list(string.ascii_uppercase)  # single tokens in Qwen/Llama tokenizers; max 26
FLOOR_LOGPROB = -30.0  # a label absent from the returned top-N gets this


@dataclass
class VerbalizerResult:
    """Per-item probability (mean over permutations, in [0, 1]) and bookkeeping."""

    scores: dict[str, float]
    usage: Usage = field(default_factory=Usage)
    calls: int = 0
    model_latency_s: float = 0.0
    label_mass: float = 0.0  # mean probability mass the model put on valid labels (0..1)
    orders: list[list[str]] = field(default_factory=list)


def label_distribution(top: Mapping[str, float], labels: Sequence[str]) -> tuple[list[float], float]:
    """Softmax over the label tokens only, from one position's top log-probabilities.

    Token strings are stripped of whitespace ("A", " A" count as A; the best wins).

    Returns:
        (probabilities aligned with `labels` summing to 1, raw probability mass on labels).
    """
    best = dict.fromkeys(labels, FLOOR_LOGPROB)
    for tok, lp in top.items():
        key = tok.strip()
        if key in best and lp > best[key]:
            best[key] = lp
    raw = [best[x] for x in labels]
    mass = sum(math.exp(x) for x in raw if x > FLOOR_LOGPROB)
    m = max(raw)
    exps = [math.exp(x - m) for x in raw]
    z = sum(exps)
    return [e / z for e in exps], mass


def permutations_for(item_ids: Sequence[str], n: int, seed: int) -> list[list[str]]:
    """`n` orders of the candidates: the given order, its reverse, then seeded shuffles.

    The reverse pairs every position with its mirror, which cancels first/last position
    bias with only two passes.
    """
    orders = [list(item_ids)]
    if n > 1:
        orders.append(list(reversed(item_ids)))
    rng = random.Random(seed)
    while len(orders) < n:
        o = list(item_ids)
        rng.shuffle(o)
        orders.append(o)
    return orders[:n]


async def verbalizer_scores(
    model: ChatModel,
    template: PromptTemplate,
    history_vars: Mapping[str, object],
    candidates: Sequence[str],
    titles: Mapping[str, str],
    *,
    permutations: int = 2,
    seed: int = 0,
    top_logprobs: int = 20,
    verb: str = "buy",
) -> VerbalizerResult:
    """Score every candidate with the model's label probabilities.

    Args:
        history_vars: variables for the history partial (`HistoryView.prompt_vars()`).
        candidates: item ids, at most 26.
        titles: item id -> title shown to the model.
        permutations: passes over different candidate orders (1 = no debiasing).
        top_logprobs: alternatives requested per token (vLLM's default cap is 20).

    Returns:
        `VerbalizerResult` with a probability per candidate (mean over passes).

    Raises:
        ValueError: more candidates than labels.
        ModelUnavailableError: from the model.
    """
    if len(candidates) > len(LABELS):
        raise ValueError(f"at most {len(LABELS)} candidates can be labelled, got {len(candidates)}")
    result = VerbalizerResult(scores=dict.fromkeys(candidates, 0.0))
    if not candidates:
        return result
    orders = permutations_for(candidates, permutations, seed)
    for order in orders:
        labels = LABELS[: len(order)]
        cands = [{"label": lab, "title": titles.get(i, f"item {i}")} for lab, i in zip(labels, order, strict=True)]
        messages = render(template, candidates=cands, verb=verb, **history_vars)
        comp = await model.complete(messages, max_tokens=1, top_logprobs=min(top_logprobs, len(labels) + 5))
        result.usage.add(comp.usage)
        result.calls += 1
        result.model_latency_s += comp.latency_s
        top = comp.top_logprobs[0] if comp.top_logprobs else {comp.text: 0.0}
        probs, mass = label_distribution(top, labels)
        result.label_mass += mass / len(orders)
        for item, p in zip(order, probs, strict=True):
            result.scores[item] += p / len(orders)
        result.orders.append(order)
    return result
