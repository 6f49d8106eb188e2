"""Learned fusion (agent/tasks/fusion.py, `shoplens train`): a fixture where only co-visitation
predicts the next item, the leave-one-out refit that hides the targets, and the manifest check."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.data.artifacts import DatasetArtifacts, build_artifacts, catalog_hash
from agent.data.candidates import DEFAULT_WEIGHTS, SOURCES
from agent.data.store import EventStore
from agent.domain.errors import ArtifactMismatchError
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.settings import Settings
from agent.tasks.fusion import (
    FUSION_FILE,
    choose_served,
    fit_fusion,
    load_fusion,
    save_fusion,
    validation_windows,
    without_targets,
)
from retrieval.embedder import HashingEmbedder

DS = "chain-shop"
N_ITEMS = 40
T0 = datetime(2024, 1, 1, tzinfo=UTC)
# Titles share no words with their chain neighbours, so embeddings carry no signal about the
# next item; every user walks the chain a, a+7, a+14, ... (mod 40): co-visitation knows it.
TITLES = {f"i{j}": f"{w} product" for j, w in enumerate(
    f"alpha{j}" if j % 2 else f"beta{j}" for j in range(N_ITEMS))}


def chain_events() -> list[BehaviorEvent]:
    rng = random.Random(7)
    out = []
    for u in range(150):
        start = rng.randrange(N_ITEMS)
        for n in range(5):
            item = f"i{(start + 7 * n) % N_ITEMS}"
            out.append(BehaviorEvent(user_id=f"u{u}", item_id=item, event_type="purchase",
                                     timestamp=T0 + timedelta(days=u, hours=n)))
    return out


@pytest.fixture
def arts(tmp_path: Path) -> DatasetArtifacts:
    store = EventStore(tmp_path / "events.sqlite")
    store.add_items(DS, [CatalogItem(item_id=i, title=t) for i, t in TITLES.items()])
    store.add_events(DS, chain_events())
    a = build_artifacts(store, DS, HashingEmbedder(64), tmp_path / "indexes" / DS, show_progress=False)
    store.close()
    return a


def test_the_informative_source_gets_the_largest_weight(arts: DatasetArtifacts) -> None:
    fusion = fit_fusion(arts, n_users=120, seed=1)
    w = fusion.weights
    assert max(w, key=lambda s: w[s]) == "covisit", w
    assert fusion.n_windows == 120 and fusion.dataset == DS
    m = fusion.metrics
    # on the held-out half the fitted weights rank at least as well as the hand-set ones
    assert m["fitted_ndcg@10"] >= m["default_ndcg@10"] - 1e-9 and m["fitted_ndcg@10"] > 50.0
    assert "kept_defaults" not in m and m["n_random"] == 60.0  # one random set per held-out window
    assert fusion.catalogue_hash == catalog_hash(arts.catalog)
    assert fit_fusion(arts, n_users=120, seed=1).weights == w  # seeded: the same fit


def test_weights_that_rank_worse_than_the_defaults_are_never_served(
    arts: DatasetArtifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.tasks import fusion as fusion_mod

    # a fit that inverts the informative source (what biased negatives once taught it)
    monkeypatch.setattr(fusion_mod, "_fit", lambda feats, seed: {"covisit": -5.0, "embedding": 0.0,
                                                                  "similar_users": 0.0, "popularity": 0.0})
    fusion = fit_fusion(arts, n_users=60, seed=0)
    m = fusion.metrics
    assert m["fitted_ndcg@10_random"] < m["default_ndcg@10_random"]
    # on this chain, co-visitation alone beats the defaults too: it is served alone, and said
    assert m["single_covisit_ndcg@10"] > m["default_ndcg@10"] + 0.5 and m["kept_single_source"] == 1.0
    assert fusion.weights == {s: float(s == "covisit") for s in SOURCES}
    assert "covisit alone ranked held-out windows better than any fusion" in fusion.note()


def _held_out(fitted: float, default: float, **single: float) -> dict[str, float]:
    """Held-out metrics with the same figure overall and for both kinds of set."""
    m = {}
    for k in ("", "_random", "_retrieved"):
        m[f"fitted_ndcg@10{k}"], m[f"default_ndcg@10{k}"] = fitted, default
        for src, v in single.items():
            m[f"single_{src}_ndcg@10{k}"] = v
    return m


def test_the_served_choice_between_fitted_defaults_and_one_source() -> None:
    assert choose_served(_held_out(70.0, 69.0, covisit=69.9)) == "fitted"
    assert choose_served(_held_out(60.0, 69.0, covisit=69.2)) == "default"  # fitted worse; covisit within 0.5
    assert choose_served(_held_out(60.0, 69.0, covisit=70.0, popularity=50.0)) == "covisit"
    assert choose_served(_held_out(70.0, 69.0, covisit=71.0)) == "covisit"  # beats even the fitted by > 0.5
    m = _held_out(70.0, 69.0, covisit=71.0)
    m["single_covisit_ndcg@10_retrieved"] = 60.0  # but worse on the served kind of set: not chosen
    assert choose_served(m) == "fitted"


def test_windows_hold_out_the_last_item_and_the_refit_never_sees_it(arts: DatasetArtifacts) -> None:
    windows = validation_windows(arts.user_items, n_users=10, seed=3)
    assert len(windows) == 10 and len({w.user_id for w in windows}) == 10
    for w in windows:
        assert arts.user_items[w.user_id] == [*w.history, w.target]
    held = without_targets(arts, windows)
    for w in windows:
        assert held.user_items[w.user_id] == w.history
    # popularity drops by exactly the held-out occurrences; the originals are untouched
    n_held = {t: sum(1 for w in windows if w.target == t) for t in {w.target for w in windows}}
    for t, n in n_held.items():
        assert held.popularity.count.get(t, 0) == arts.popularity.count[t] - n
    assert held.item_index is arts.item_index  # embeddings see no behaviour: reused


def test_saved_weights_are_checked_on_load(arts: DatasetArtifacts, tmp_path: Path) -> None:
    fusion = fit_fusion(arts, n_users=40, seed=0)
    folder = tmp_path / "idx"
    path = save_fusion(fusion, folder)
    assert path.name == FUSION_FILE
    chash = catalog_hash(arts.catalog)
    loaded = load_fusion(folder, DS, chash, arts.user_items)
    assert loaded is not None and loaded.weights == fusion.weights and not loaded.stale
    # events added since training: still used, marked stale, and the note says so
    grown = {**arts.user_items, "newcomer": ["i1", "i8"]}
    stale = load_fusion(folder, DS, chash, grown)
    assert stale is not None and stale.stale and "re-run `shoplens train`" in stale.note()
    with pytest.raises(ArtifactMismatchError, match="fitted for dataset 'chain-shop', not 'other-shop'"):
        load_fusion(folder, "other-shop", chash, arts.user_items)
    body = json.loads(path.read_text())
    body["weights"]["covisit"] = 99.0  # edited by hand
    path.write_text(json.dumps(body))
    with pytest.raises(ArtifactMismatchError, match="sha256 does not match"):
        load_fusion(folder, DS, chash, arts.user_items)
    assert load_fusion(tmp_path / "never-trained", DS, chash, arts.user_items) is None


async def test_train_through_the_facade_changes_what_answers_say(tmp_path: Path) -> None:
    rt = Runtime(Settings(workspace=tmp_path / "ws", embedder="hashing-64"))
    rt.store.add_items(DS, [CatalogItem(item_id=i, title=t) for i, t in TITLES.items()])
    rt.store.add_events(DS, chain_events())
    svc = ShopLensService(rt, use_model=False)
    before = await svc.next_item(DS, "u3", config=svc.next_item_config(k=3, use_model=False))
    assert any(n.startswith("fusion: default source weights") for n in before.meta.notes)
    fusion, path = svc.train(DS, users=60, seed=0)
    assert path == rt.settings.index_dir(DS) / FUSION_FILE and path.exists()
    after = await svc.next_item(DS, "u3", config=svc.next_item_config(k=3, use_model=False))
    assert any(n.startswith("fusion: fitted by `shoplens train` on 60 windows") for n in after.meta.notes)
    # a fresh process (the API after a restart) loads the same weights from disk
    rt2 = Runtime(Settings(workspace=tmp_path / "ws", embedder="hashing-64"))
    assert rt2.artifacts(DS).fusion_weights == fusion.weights
    assert fusion.weights != DEFAULT_WEIGHTS
    await rt.aclose()
    await rt2.aclose()


def test_weights_fitted_before_a_source_existed_are_not_served(arts: DatasetArtifacts) -> None:
    from dataclasses import replace

    fusion = fit_fusion(arts, n_users=40, seed=0)
    assert set(fusion.weights) == set(DEFAULT_WEIGHTS)  # every current source, "recent" included
    weights, note = fusion.served()
    assert weights == fusion.weights and note == fusion.note()
    # a fusion.json written before the `recent` source: serving it would give that source 0
    old = replace(fusion, weights={k: v for k, v in fusion.weights.items() if k != "recent"})
    assert old.missing_sources == ["recent"]
    weights, note = old.served()
    assert weights is None
    assert "predate source(s) recent" in note and "shoplens train --dataset chain-shop" in note
    # training that kept the defaults serves the current defaults, not a copy frozen in the file
    kept = replace(fusion, weights={"covisit": 1.0}, metrics={**fusion.metrics, "kept_defaults": 1.0})
    assert kept.missing_sources and kept.served()[0] is None
    kept_all = replace(fusion, metrics={**fusion.metrics, "kept_defaults": 1.0})
    assert kept_all.served() == (None, kept_all.note())


def test_windows_whose_target_no_other_event_holds_are_skipped(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.sqlite")
    cold = {f"cold{k}": f"gamma{k} gadget" for k in range(30)}
    store.add_items(DS, [CatalogItem(item_id=i, title=t) for i, t in {**TITLES, **cold}.items()])
    # 30 users whose last item occurs in no other event: after the hold-out it has no count at all
    extra = [BehaviorEvent(user_id=f"c{k}", item_id=item, event_type="purchase",
                           timestamp=T0 + timedelta(days=200 + k, hours=n))
             for k in range(30) for n, item in enumerate(["i0", "i7", f"cold{k}"])]
    store.add_events(DS, [*chain_events(), *extra])
    a = build_artifacts(store, DS, HashingEmbedder(64), tmp_path / "indexes" / DS, show_progress=False)
    store.close()
    fusion = fit_fusion(a, n_users=500, seed=0)  # every one of the 180 users
    assert fusion.n_windows == 180
    assert fusion.metrics["n_cold_targets_skipped"] == 30.0
    # 150 warm windows, split in half: 75 held-out random sets
    assert fusion.metrics["n_random"] == 75.0
