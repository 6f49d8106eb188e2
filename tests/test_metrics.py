"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from eval.metrics import (
    METRICS,
    evaluate_rankings,
    get_metric,
    hit_rate_at_k,
    mean_at_k,
    mrr,
    ndcg_at_k,
    recall_at_k,
)

RANKED = ["a", "b", "c", "d", "e"]


def test_ndcg_single_target_by_rank() -> None:
    assert ndcg_at_k(RANKED, {"a"}, 10) == pytest.approx(1.0)
    # rank 3 -> 1 / log2(3 + 1) = 1 / 2
    assert ndcg_at_k(RANKED, {"c"}, 10) == pytest.approx(0.5)
    # rank 2 -> 1 / log2(3) = 0.63093
    assert ndcg_at_k(RANKED, {"b"}, 10) == pytest.approx(0.6309297535714575)
    # not in the top k -> 0
    assert ndcg_at_k(RANKED, {"e"}, 4) == 0.0
    assert ndcg_at_k(RANKED, {"z"}, 10) == 0.0


def test_ndcg_multi_relevant_by_hand() -> None:
    # relevant {b, d}; k = 3: DCG = 1/log2(3) = 0.63093 (b at rank 2, d cut off);
    # ideal DCG over min(3, 2) = 2 slots = 1 + 1/log2(3) = 1.63093 -> 0.38685
    assert ndcg_at_k(RANKED, {"b", "d"}, 3) == pytest.approx(0.6309297536 / 1.6309297536)
    # k = 4: DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068 = 1.06161 -> 0.65092
    assert ndcg_at_k(RANKED, {"b", "d"}, 4) == pytest.approx(1.0616063 / 1.6309298, rel=1e-6)
    # k = 1 with two relevant, one on top: ideal DCG over min(1, 2) = 1 slot -> 1.0
    assert ndcg_at_k(RANKED, {"a", "d"}, 1) == pytest.approx(1.0)


def test_hit_rate_recall_mrr() -> None:
    assert hit_rate_at_k(RANKED, {"c"}, 3) == 1.0
    assert hit_rate_at_k(RANKED, {"c"}, 2) == 0.0
    assert recall_at_k(RANKED, {"b", "e"}, 3) == 0.5
    assert recall_at_k(RANKED, set(), 3) == 0.0
    assert mrr(RANKED, {"d"}) == 0.25
    assert mrr(RANKED, {"d"}, 3) == 0.0
    assert mrr(RANKED, {"z"}) == 0.0


def test_bad_k_raises() -> None:
    with pytest.raises(ValueError):
        ndcg_at_k(RANKED, {"a"}, 0)


def test_registry_and_aggregates_are_x100() -> None:
    assert set(METRICS) >= {"hr", "ndcg", "recall", "mrr"}
    assert get_metric("ndcg") is ndcg_at_k
    with pytest.raises(KeyError, match="known"):
        get_metric("auc")
    rankings = [RANKED, RANKED, []]  # the empty ranking is an invalid answer: counts as a miss
    relevant = [{"a"}, {"c"}, {"a"}]
    # (1 + 0.5 + 0) / 3 x100
    assert mean_at_k("ndcg", rankings, relevant, 10) == pytest.approx(50.0)
    out = evaluate_rankings(rankings, relevant, ks=(1, 5))
    assert out["hr@1"] == pytest.approx(100 / 3)
    assert out["hr@5"] == pytest.approx(200 / 3)
    assert out["ndcg@1"] == pytest.approx(100 / 3)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) * 100 / 3)
    with pytest.raises(ValueError):
        mean_at_k("hr", rankings, relevant[:2], 1)
