"""Co-visitation and popularity against hand-computed counts and scores.

Sequences: s1 = a b c, s2 = a c, s3 = b c a; window 2, distance decay 0.5.

forward (b follows a within 2 steps, weight 0.5 ** (distance - 1)):
    s1: a->b 1, a->c 0.5, b->c 1    s2: a->c 1    s3: b->c 1, b->a 0.5, c->a 1
    => a: {b: 1, c: 1.5}   b: {c: 2, a: 0.5}   c: {a: 1}
cooc (once per sequence and unordered pair, whole sequence):
    ab: s1, s3 = 2   ac: s1, s2, s3 = 3   bc: s1, s3 = 2
item counts: a 3, b 2, c 3
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from retrieval.covisit import CoVisitation, CoVisitationConfig
from retrieval.popularity import Popularity

SEQS = [["a", "b", "c"], ["a", "c"], ["b", "c", "a"]]
CFG = CoVisitationConfig(window=2, distance_decay=0.5, cooc_window=None, recency=0.5,
                         max_history=20, forward_weight=1.0, cooc_weight=0.5, normalisation="none")


@pytest.fixture
def cv() -> CoVisitation:
    return CoVisitation(CFG).fit(SEQS)


def test_counts(cv: CoVisitation) -> None:
    assert cv.forward == {"a": {"b": 1.0, "c": 1.5}, "b": {"c": 2.0, "a": 0.5}, "c": {"a": 1.0}}
    assert cv.cooc == {
        "a": {"b": 2.0, "c": 3.0}, "b": {"a": 2.0, "c": 2.0}, "c": {"a": 3.0, "b": 2.0},
    }
    assert cv.item_count == {"a": 3, "b": 2, "c": 3}


def test_scores_for_given_candidates(cv: CoVisitation) -> None:
    # history [a]: b = fwd 1 + 0.5 * cooc 2 = 2; c = 1.5 + 0.5 * 3 = 3
    assert cv.score(["a"], ["b", "c", "zz"]) == {"b": 2.0, "c": 3.0, "zz": 0.0}
    # history [a, b]: b is newest (w 1): c = 2 + 0.5 * 2 = 3; a (w 0.5): c += 0.5 * (1.5 + 1.5)
    assert cv.score(["a", "b"], ["c"]) == {"c": pytest.approx(4.5)}
    # an item never scores against itself: a's own row is skipped, b (w 0.5) -> a 0.5 + 1
    assert cv.score(["b", "a"], ["a"]) == {"a": pytest.approx(0.5 * (0.5 + 0.5 * 2))}


def test_scores_for_candidate_generation(cv: CoVisitation) -> None:
    # history [c]: a = fwd 1 + 0.5 * 3 = 2.5; b = 0 + 0.5 * 2 = 1; c itself excluded
    assert list(cv.score(["c"]).items()) == [("a", 2.5), ("b", 1.0)]
    assert cv.score(["c"], top_n=1) == {"a": 2.5}
    assert cv.score(["a", "b", "c"]) == {}  # everything already seen
    assert cv.score(["unknown"]) == {}


def test_the_two_scorers_agree(cv: CoVisitation) -> None:
    for history in (["a"], ["c"], ["a", "b"], ["b", "c"]):
        top = cv.score(history, top_n=10)
        assert cv.score(history, list(top)) == pytest.approx(top)


def test_normalisations(cv: CoVisitation) -> None:
    cosine = cv.with_config(normalisation="cosine")
    # a->b: (1 + 0.5 * 2) / sqrt(3 * 2)
    assert cosine.score(["a"], ["b"])["b"] == pytest.approx(2 / math.sqrt(6))
    row = cv.with_config(normalisation="row")
    # a's forward row sums to 2.5, its cooc row to 5: 1 / 2.5 + 0.5 * 2 / 5
    assert row.score(["a"], ["b"])["b"] == pytest.approx(0.6)
    assert cv.config.normalisation == "none"  # the original is untouched
    with pytest.raises(ValueError, match="refit"):
        cv.with_config(window=5)


def test_window_and_decay() -> None:
    cv = CoVisitation(CoVisitationConfig(window=1, cooc_weight=0.0)).fit([["a", "b", "c", "a"]])
    assert cv.forward == {"a": {"b": 1.0}, "b": {"c": 1.0}, "c": {"a": 1.0}}
    cv = CoVisitation(CoVisitationConfig(window=3, distance_decay=0.5)).fit([["a", "x", "a", "b"]])
    # a->x 1, a->b: from position 0 at distance 3 (0.25) and from position 2 at distance 1 (1)
    assert cv.forward["a"] == {"x": 1.0, "b": 1.25}
    assert cv.cooc["a"] == {"x": 1.0, "b": 1.0}  # once per sequence
    with pytest.raises(ValueError, match="window"):
        CoVisitation(CoVisitationConfig(window=0)).fit(SEQS)


def test_save_load_round_trip(cv: CoVisitation, tmp_path: Path) -> None:
    cv.save(tmp_path / "covisit.json")
    back = CoVisitation.load(tmp_path / "covisit.json")
    assert back.config == cv.config
    assert back.forward == cv.forward and back.cooc == cv.cooc
    assert back.item_count == cv.item_count
    for history in (["a"], ["c"], ["a", "b"]):
        assert back.score(history) == cv.score(history)
    assert back.with_config(normalisation="row").score(["a"], ["b"]) == pytest.approx({"b": 0.6})


def test_load_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a ShopLens co-visitation file"):
        CoVisitation.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"format": "shoplens.covisitation", "version": 99}')
    with pytest.raises(ValueError, match="version 99"):
        CoVisitation.load(tmp_path / "y.json")


def test_popularity(tmp_path: Path) -> None:
    pop = Popularity().fit(SEQS + [["c"]])
    assert pop.count == {"a": 3, "b": 2, "c": 4}
    assert pop.total == 9
    assert pop.top(2) == ["c", "a"]
    assert pop.top(10, exclude=["c"]) == ["a", "b"]
    assert pop.score(["a", "zz"]) == {"a": 3.0, "zz": 0.0}
    assert pop.score(["a", "zz"], log=True) == pytest.approx({"a": math.log(4), "zz": 0.0})
    # ties broken by id
    assert Popularity().fit([["y", "x"]]).top() == ["x", "y"]
    # the order is sorted once and reused; a refit (new counts) is sorted again
    assert pop.top(1) == ["c"] and pop.fit([["b"], ["b"], ["a"]]).top(3) == ["b", "a"]
    assert pop.top(5, exclude=["b"]) == ["a"]
    pop.save(tmp_path / "pop.json")
    back = Popularity.load(tmp_path / "pop.json")
    assert back.count == pop.count and back.total == pop.total
    (tmp_path / "bad.json").write_text('{"format": "shoplens.popularity", "version": 2}')
    with pytest.raises(ValueError, match="not a ShopLens popularity file"):
        Popularity.load(tmp_path / "bad.json")
