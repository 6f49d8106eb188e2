"""Position-free LLM scoring of candidates: one yes/no question per candidate.

Each candidate gets its own prompt: the user's history (a prefix shared by every candidate of
that user), then the candidate's title and "Answer yes or no.". The score is the margin
``log P(yes) - log P(no)`` of the first answer token, read from the top log-probabilities of a
one-token completion (the pointwise setting of TALLRec, Bao et al., RecSys 2023, arXiv
2305.00447, here zero-shot). No candidate ever sees another, so there is no position bias by
construction, and the model cannot name an item outside the candidate set.

Cost: the candidates of one user are asked one after another, so a server with prefix caching
(vLLM ``--enable-prefix-caching``; the embedded server, `agent.llm.servers.llama_app`) evaluates
the shared history once and each candidate's short tail after it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.llm.base import ChatModel, Usage
from agent.llm.prompting import PromptTemplate, render

YES = frozenset({"yes"})  # compared after strip() and lower(): "Yes", " yes", "YES"
NO = frozenset({"no"})
FLOOR_LOGPROB = -30.0  # "yes" or "no" absent from the returned top-N gets this
TOP_LOGPROBS = 20  # the OpenAI API's and vLLM's default cap


@dataclass
class PointwiseResult:
    """Per-candidate yes/no margins and bookkeeping.

    Attributes:
        margins: item id -> ``log P(yes) - log P(no)`` (natural log; higher = more likely).
        p_yes: item id -> ``P(yes) / (P(yes) + P(no))`` in [0, 1] (the sigmoid of the margin).
        answered: the share of candidates whose top tokens held "yes" or "no" (0..1); a low
            value means the prompt did not make the model answer yes/no.
        cached_tokens: prompt tokens the server reused from its prefix cache (where reported).
    """

    margins: dict[str, float]
    p_yes: dict[str, float]
    usage: Usage = field(default_factory=Usage)
    calls: int = 0
    model_latency_s: float = 0.0
    answered: float = 0.0


def yes_no_margin(top: Mapping[str, float]) -> tuple[float, bool]:
    """``(log P(yes) - log P(no), whether either token was among the top)`` from one position's
    top log-probabilities ``{token text: natural-log probability}``. Each side takes its best
    spelling ("yes", " Yes", ...); a side absent from the top gets `FLOOR_LOGPROB`."""
    best_yes = best_no = FLOOR_LOGPROB
    for tok, lp in top.items():
        key = tok.strip().lower()
        if key in YES:
            best_yes = max(best_yes, lp)
        elif key in NO:
            best_no = max(best_no, lp)
    return best_yes - best_no, (best_yes > FLOOR_LOGPROB or best_no > FLOOR_LOGPROB)


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


async def pointwise_scores(
    model: ChatModel,
    template: PromptTemplate,
    variables: Mapping[str, Any],
    item_ids: Sequence[str],
    titles: Mapping[str, str],
    *,
    top_logprobs: int = TOP_LOGPROBS,
) -> PointwiseResult:
    """Ask the model, for each candidate, whether the user will interact with it next.

    Args:
        model: the model seam (one-token completions with top log-probabilities).
        template: a pointwise prompt whose user message ends with the ``candidate`` variable
            (``next_item_pointwise.v1``, ``next_item_pointwise_titles.v1``), so that every
            candidate's prompt shares the same leading bytes.
        variables: the template's other variables (the history), the same for every candidate.
        item_ids: the candidate set, in any order (the order changes nothing but the cache).
        titles: item id -> title shown to the model.

    Returns:
        A `PointwiseResult` with a margin for every candidate.

    Raises:
        ModelUnavailableError / ModelRequestError: from the model (no partial result).
    """
    res = PointwiseResult(margins={}, p_yes={})
    answered = 0
    for item in item_ids:
        messages = render(template, **variables, candidate=titles.get(item, f"item {item}"))
        comp = await model.complete(messages, max_tokens=1, top_logprobs=top_logprobs)
        top = comp.top_logprobs[0] if comp.top_logprobs else {comp.text: 0.0}
        margin, ok = yes_no_margin(top)
        answered += ok
        res.margins[item] = round(margin, 6)
        res.p_yes[item] = sigmoid(margin)
        res.usage.add(comp.usage)
        res.calls += 1
        res.model_latency_s += comp.latency_s
    res.answered = answered / len(item_ids) if item_ids else 0.0
    return res
