"""The benchmark's pure helpers against hand-computed values (no timing is asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.llm import CallRecord, nonce_messages
from bench.pipeline import stage_breakdown
from bench.retrieval import ivf_params, mixture_centres, sample_mixture
from bench.stats import model_time_estimate, percentile, ratio, recall_at_k, summarize


def test_percentile_interpolates_between_closest_ranks() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1, 2, 3, 4; positions 0..3
    assert percentile(xs, 50) == pytest.approx(2.5)  # pos 1.5
    assert percentile(xs, 95) == pytest.approx(3.85)  # pos 2.85: 3 + 0.85 * 1
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile([7.0], 95) == 7.0
    assert percentile(xs, 95) == pytest.approx(float(np.percentile(xs, 95)))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    s = summarize([0.1, 0.3, 0.2])
    assert s["n"] == 3
    assert s["p50"] == pytest.approx(0.2)
    assert s["mean"] == pytest.approx(0.2)
    assert (s["min"], s["max"]) == (0.1, 0.3)


def test_recall_at_k_counts_shared_ids_and_ignores_missing() -> None:
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [6, -1, -1]])  # 2 of 3, then 1 of 3 (-1 = no neighbour)
    assert recall_at_k(approx, exact, 3) == pytest.approx(3 / 6)
    assert recall_at_k(approx, exact, 1) == pytest.approx(0.0)  # {3} vs {1}, {6} vs {4}
    assert recall_at_k(exact, exact, 3) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(approx[:1], exact, 3)
    with pytest.raises(ValueError):
        recall_at_k(approx, exact, 4)


def test_ratio_and_model_time_estimate() -> None:
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(1.0, 0.0) is None
    # 1000 prompt tokens at 100 tok/s + 50 generated at 10 tok/s = 10 s + 5 s
    assert model_time_estimate(1000, 50, 100.0, 10.0) == pytest.approx(15.0)
    with pytest.raises(ValueError):
        model_time_estimate(1, 1, 0.0, 1.0)


def test_stage_breakdown_splits_the_request_window() -> None:
    calls = [CallRecord("verbalizer", 1.0, 3.0, 100, 1), CallRecord("verbalizer", 3.5, 5.0, 100, 1),
             CallRecord("structured", 5.25, 9.0, 200, 50)]
    st = stage_breakdown(0.0, 10.0, calls)
    assert st == {"history+retrieval": 1.0, "verbalizer calls": 3.5, "fusion": 0.75,
                  "explanation call": 3.75, "validation+output": 1.0}
    assert sum(st.values()) == pytest.approx(10.0)
    assert stage_breakdown(0.0, 2.0, [])["history+retrieval"] == 2.0


def test_nonce_messages_changes_only_the_first_message_start() -> None:
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "u"}]
    a, b = nonce_messages(msgs), nonce_messages(msgs)
    assert a[0]["content"].endswith("sys") and a[0]["content"] != b[0]["content"]
    assert a[1] == msgs[1] and msgs[0]["content"] == "sys"


def test_synthetic_catalogue_is_unit_norm_and_ivf_params_scale() -> None:
    x = sample_mixture(mixture_centres(1000, 16, seed=0), 250, seed=1, chunk=100)
    assert x.shape == (250, 16) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert ivf_params(10_000) == (256, 8)  # 4 sqrt(n) = 400 capped at n / 39 = 256
    assert ivf_params(1_000_000) == (4000, 80)


def test_review_token_limit_is_the_tokens_at_the_calibrated_rates() -> None:
    from bench.llm import CallRecord
    from bench.reviews import token_limit_s

    rates = {"pp_tok_s": 100.0, "gen_tok_s": 20.0, "gen_json_tok_s": 10.0}
    calls = [CallRecord("verbalizer", 0, 1, prompt_tokens=330, completion_tokens=11, cached_tokens=300),
             CallRecord("structured", 0, 1, prompt_tokens=250, completion_tokens=21, cached_tokens=0)]
    # 30/100 + 10/20 for the joint call; 250/100 + 20/10 for the JSON call
    assert token_limit_s(calls, rates) == pytest.approx(0.3 + 0.5 + 2.5 + 2.0)
