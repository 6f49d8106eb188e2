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
import random
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


# ---- incremental updates (issue 17): `updated` equals a refit --------------------------------


def test_updated_with_an_appended_sequence_matches_hand_counts(cv: CoVisitation) -> None:
    # s2 = a c gets b appended: new transitions c->b 1 and a->b 0.5 (two steps back); new
    # co-occurring pairs ab and bc (ac was counted); b occurs once more
    up = cv.updated([(["a", "c"], ["a", "c", "b"])])
    assert up.forward == {"a": {"b": 1.5, "c": 1.5}, "b": {"c": 2.0, "a": 0.5}, "c": {"a": 1.0, "b": 1.0}}
    assert up.cooc == {"a": {"b": 3.0, "c": 3.0}, "b": {"a": 3.0, "c": 3.0}, "c": {"a": 3.0, "b": 3.0}}
    assert up.item_count == {"a": 3, "b": 3, "c": 3}
    assert up.score(["a"], ["b", "c"]) == CoVisitation(CFG).fit(
        [SEQS[0], ["a", "c", "b"], SEQS[2]]).score(["a"], ["b", "c"])
    # the original is untouched (other threads may be scoring with it)
    assert cv.forward["c"] == {"a": 1.0} and cv.item_count["b"] == 2


def test_updated_removing_every_sequence_leaves_nothing(cv: CoVisitation) -> None:
    up = cv.updated([(s, []) for s in SEQS])
    assert (up.forward, up.cooc, up.item_count, up._forward_row, up._cooc_row) == ({}, {}, {}, {}, {})
    assert up.score(["a"], top_n=5) == {}


@pytest.mark.parametrize("cooc_window", [None, 2])
def test_updated_equals_a_refit_for_appends_rewrites_new_and_removed_users(cooc_window: int | None) -> None:
    rng = random.Random(7)
    items = [f"i{n}" for n in range(12)]
    users = {f"u{n}": [rng.choice(items) for _ in range(rng.randint(1, 15))] for n in range(30)}
    cfg = CoVisitationConfig(window=3, distance_decay=0.5, cooc_window=cooc_window)
    base = CoVisitation(cfg).fit(users.values())
    after = dict(users)
    after["u0"] = users["u0"] + ["i1", "i2", "i1"]  # appended (events in time order)
    after["u1"] = ["i3"] + users["u1"]  # a back-filled older event: not a prefix
    after["new"] = ["i4", "i5", "i4", "i6"]  # a user the counts never saw
    del after["u2"]  # deleted
    changes = [(users.get(u, []), after.get(u, [])) for u in ("u0", "u1", "new", "u2")]
    up = base.updated(changes)
    refit = CoVisitation(cfg).fit(after.values())
    assert (up.forward, up.cooc, up.item_count) == (refit.forward, refit.cooc, refit.item_count)
    assert up._forward_row == pytest.approx(refit._forward_row) and up._cooc_row == pytest.approx(refit._cooc_row)
    pop = Popularity().fit(users.values()).updated(changes)
    assert (pop.count, pop.total) == (Popularity().fit(after.values()).count, Popularity().fit(after.values()).total)


def test_popularity_updated_drops_items_no_one_has_and_keeps_the_original(tmp_path: Path) -> None:
    pop = Popularity().fit(SEQS)
    up = pop.updated([(["a", "c"], ["c", "d"]), (["b", "c", "a"], [])])
    assert (up.count, up.total) == ({"a": 1, "b": 1, "c": 2, "d": 1}, 5)
    assert up.top(2) == ["c", "a"]
    assert pop.count == {"a": 3, "b": 2, "c": 3}
