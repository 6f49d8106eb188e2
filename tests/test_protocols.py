"""LLMRank protocol: case construction on synthetic lines, then Pop on the real Games-200."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.protocols import RankingCase, UserSequence, llmrank_cases


def _data() -> tuple[dict[str, UserSequence], dict[str, list[str]]]:
    interactions = {
        f"u{i}": UserSequence(f"u{i}", tuple(f"h{i}_{j}" for j in range(5)), f"t{i}")
        for i in range(30)
    }
    # 100 candidates per user; for even users the target sits inside the first 19.
    candidates = {}
    for i in range(30):
        line = [f"c{i}_{j}" for j in range(100)]
        if i % 2 == 0:
            line.insert(7, f"t{i}")
        candidates[f"u{i}"] = line
    return interactions, candidates


def test_target_exactly_once_in_exactly_20() -> None:
    interactions, candidates = _data()
    cases = llmrank_cases(interactions, candidates)
    assert len(cases) == 30
    for case in cases:
        assert len(case.candidates) == 20
        assert case.candidates.count(case.target) == 1
        assert len(set(case.candidates)) == 20
        assert case.history == interactions[case.user_id].history


def test_target_removed_before_truncation() -> None:
    interactions, candidates = _data()
    case = llmrank_cases(interactions, candidates, users=["u0"])[0]
    # u0's line has t0 at index 7: removing it first leaves c0_0..c0_18 as the 19 negatives
    # (truncating first would have kept only c0_0..c0_17 plus a duplicate target).
    assert set(case.candidates) - {"t0"} == {f"c0_{j}" for j in range(19)}


def test_shuffle_is_seeded_and_reproducible() -> None:
    interactions, candidates = _data()
    a = llmrank_cases(interactions, candidates, seed=7)
    b = llmrank_cases(interactions, candidates, seed=7)
    c = llmrank_cases(interactions, candidates, seed=8)
    assert [x.candidates for x in a] == [x.candidates for x in b]
    assert [x.candidates for x in a] != [x.candidates for x in c]
    # a case's order depends on (seed, user), not on which other users are listed
    alone = llmrank_cases(interactions, candidates, users=["u5"], seed=7)[0]
    assert alone.candidates == next(x for x in a if x.user_id == "u5").candidates
    assert all(x.seed == 7 for x in a)
    # the target lands at many different positions
    assert len({x.target_index for x in a}) > 5


def test_position_bias_variants() -> None:
    interactions, candidates = _data()
    first = llmrank_cases(interactions, candidates, position="first")
    last = llmrank_cases(interactions, candidates, position="last")
    assert all(x.target_index == 0 for x in first)
    assert all(x.target_index == 19 for x in last)
    assert all(x.position == "first" for x in first)
    # same 20 items as the shuffled variant
    shuffled = llmrank_cases(interactions, candidates)
    assert all(set(f.candidates) == set(s.candidates) for f, s in zip(first, shuffled, strict=True))


def test_errors_carry_the_user() -> None:
    interactions, candidates = _data()
    with pytest.raises(KeyError, match="u99"):
        llmrank_cases(interactions, {"u99": candidates["u0"]})
    with pytest.raises(ValueError, match="u1"):
        llmrank_cases(interactions, {"u1": candidates["u1"][:10]})
    with pytest.raises(ValueError, match="exactly once"):
        RankingCase("u", ("a",), ("b", "c"), "d")


def _data_dir() -> Path:
    try:
        from agent.settings import Settings

        return Path(Settings().data_dir)
    except Exception:  # noqa: BLE001 - settings unavailable: the documented default layout
        return Path(__file__).parents[1].parent / "shared" / "data"


@pytest.mark.real_data
def test_pop_reproduces_published_on_games200_random() -> None:
    root = _data_dir() / "amazon-games"
    if not (root / "Games-200" / "Games.random").exists():
        pytest.skip(f"LLMRank Games data absent under {root}")
    from eval.baselines import PopularityScorer, ScoreRanker
    from eval.protocols import load_llmrank_candidates, load_llmrank_interactions
    from eval.run_llmrank_baselines import score_ranker, training_sequences
    from retrieval.popularity import Popularity

    interactions = load_llmrank_interactions(root)
    cand = load_llmrank_candidates(root / "Games-200" / "Games.random")
    held_out = set(load_llmrank_candidates(root / "Games-6k.random.gz")) | set(cand)
    pop = Popularity().fit(training_sequences(interactions, held_out))
    cases = llmrank_cases(interactions, cand)
    assert len(cases) == 200
    ndcg10 = score_ranker(ScoreRanker(PopularityScorer(pop)), cases)["ndcg@10"]
    # Published Pop: 52.96 (LLMRank Table 2). We measured 53.24 with seed 2023; our counts come
    # from a slightly different training set (histories + non-evaluated users' targets vs
    # RecBole's train split), so allow +-2.5 around the paper (the seed-to-seed spread over
    # shuffles is ~0.3, since popularity ties are rare).
    assert 50.5 <= ndcg10 <= 55.5, ndcg10


def test_full_cases_exclude_history_unless_repurchase() -> None:
    from eval.protocols import RankingCase
    from eval.suites import _full_cases

    class Scores:  # a fused ranker's interface: item -> score over the case's candidates
        def scores(self, case: RankingCase) -> dict[str, float]:
            return {i: {"a": 9.0, "b": 5.0, "c": 4.0, "d": 1.0}[i] for i in case.candidates}

    case = RankingCase("u1", ("a", "x"), ("a",), "a", seed=1)
    catalogue = ["a", "b", "c", "d"]
    # the target "a" is a repurchase: with history excluded it stays in the pool only as the target
    out, recall = _full_cases([case], Scores(), catalogue, seed=1, position="first", k=2)
    assert out[0][0].candidates == ("b", "c") and recall == 0.0
    out, recall = _full_cases([case], Scores(), catalogue, seed=1, position="first", k=2, repurchase=True)
    assert out[0][0].candidates == ("a", "b") and recall == 100.0
