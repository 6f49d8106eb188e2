"""Incremental user-side updates (agent.data.user_updates, issue 17) give what a full build from
the store gives, across restarts, deletions, crashes mid-update and events stored while the
artifacts were not loaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import agent.data.user_updates as uu
from agent.data.artifacts import (
    DatasetArtifacts,
    build_artifacts,
    drop_user_from_artifacts,
    load_artifacts,
)
from agent.data.store import EventStore
from agent.domain.schemas import BehaviorEvent, CatalogItem
from retrieval.covisit import CoVisitation
from retrieval.embedder import HashingEmbedder
from retrieval.index import VectorIndex

DS = "shop"
CATALOG = {"m1": "White ceramic mug", "m2": "Blue ceramic mug", "t1": "Ceramic teapot", "t2": "Green tea tin",
           "c1": "Vanilla scented candle", "c2": "Rose scented candle", "g1": "Garden spade", "g2": "Garden gloves"}
EVENTS = {"u1": ["m1", "t1", "c1"], "u2": ["m1", "t1", "t2", "c1"], "u3": ["g1", "g2", "c2"], "u4": ["c1", "c2", "m2"]}
EMB = HashingEmbedder(32)


def ev(user: str, item: str, day: int, kind: str = "purchase", month: int = 12) -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, event_type=kind, timestamp=f"2011-{month:02d}-{day:02d}T10:00:00Z")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore(tmp_path / "events.sqlite")
    s.add_items(DS, [CatalogItem(item_id=i, title=t) for i, t in CATALOG.items()])
    s.add_events(DS, [ev(u, i, d + 1) for u, items in EVENTS.items() for d, i in enumerate(items)])
    yield s
    s.close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "indexes" / DS


@pytest.fixture
def arts(store: EventStore, folder: Path) -> DatasetArtifacts:
    return build_artifacts(store, DS, EMB, folder, show_progress=False)


def load(store: EventStore, folder: Path) -> DatasetArtifacts:
    return load_artifacts(store, DS, EMB.name, EMB.dim, folder)


def assert_as_built(arts: DatasetArtifacts, store: EventStore, tmp_path: Path) -> None:
    """`arts` equals a fresh build from the store: sequences, user vectors, counts."""
    ref = build_artifacts(store, DS, EMB, tmp_path / "reference", show_progress=False)
    assert arts.user_items == ref.user_items
    assert sorted(arts.user_index.ids) == sorted(ref.user_index.ids)
    for u in ref.user_index.ids:
        np.testing.assert_allclose(arts.user_index.vector(u), ref.user_index.vector(u), atol=1e-6)
    assert (arts.covisit.forward, arts.covisit.cooc, arts.covisit.item_count) == (
        ref.covisit.forward, ref.covisit.cooc, ref.covisit.item_count)
    assert (arts.popularity.count, arts.popularity.total) == (ref.popularity.count, ref.popularity.total)
    assert arts.updates.events == store.counts(DS)["events"]


def test_new_changed_backfilled_and_deleted_users_match_a_rebuild(arts: DatasetArtifacts, store: EventStore,
                                                                 folder: Path, tmp_path: Path) -> None:
    before = arts.user_index
    added = store.add_events(DS, [ev("n1", "m2", 5), ev("n1", "t2", 6), ev("n1", "m2", 7),  # new
                                  ev("u1", "t2", 9),  # appended
                                  ev("u3", "m1", 30, "view", month=11),  # back-filled: before u3's first
                                  ev("cold", "not-in-catalogue", 3)])  # no catalogue item: no vector
    n_deleted = store.delete_user(DS, "u4")
    report = uu.update_users(arts, store, ["n1", "u1", "u3", "cold", "u4"], folder, added_events=added - n_deleted,
                             now=1_000.0)
    assert (report.added, report.changed, report.removed, report.cold_start, report.covisit_saved) == (
        ["cold", "n1"], ["u1", "u3"], ["u4"], ["cold"], True)  # a deletion saves co-visitation at once
    assert arts.user_items["n1"] == ["m2", "t2", "m2"] and arts.user_items["u3"] == ["m1", "g1", "g2", "c2"]
    assert arts.user_index.ids == ["u1", "u2", "u3", "n1"]  # replaced rows stay in place, new ones appended
    assert before.ids == ["u1", "u2", "u3", "u4"]  # the index readers held is untouched
    assert_as_built(arts, store, tmp_path)
    assert (arts.updates.users_updated, arts.updates.updated_at, arts.updates.covisit_base) == (5, 1_000.0, {})
    # a restart reads back exactly this
    assert_as_built(load(store, folder), store, tmp_path)


def test_unsaved_co_visitation_changes_are_replayed_on_load(arts: DatasetArtifacts, store: EventStore,
                                                            folder: Path, tmp_path: Path) -> None:
    saved_covisit = (folder / "covisit.json").read_bytes()
    added = store.add_events(DS, [ev("n1", "g1", 5), ev("n1", "m1", 6), ev("u2", "g2", 9)])
    report = uu.update_users(arts, store, ["n1", "u2"], folder, added_events=added)
    assert report.covisit_saved is False and (folder / "covisit.json").read_bytes() == saved_covisit
    logged = json.loads((folder / "updates.json").read_text())
    assert logged["covisit_base"] == {"n1": [], "u2": ["m1", "t1", "t2", "c1"]}  # what covisit.json counted
    assert (logged["dirty"], logged["events"]) == (False, 13 + 3)
    assert arts.covisit.cooc["g1"]["m1"] == 1.0  # in memory at once
    back = load(store, folder)
    assert back.updates.covisit_base == logged["covisit_base"]
    assert_as_built(back, store, tmp_path)


def test_co_visitation_is_saved_once_the_user_or_age_bound_is_reached(
        arts: DatasetArtifacts, store: EventStore, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uu, "COVISIT_SAVE_EVERY_USERS", 3)
    store.add_events(DS, [ev("n1", "g1", 5), ev("n2", "m1", 6)])
    assert uu.update_users(arts, store, ["n1", "n2"], folder, now=100.0).covisit_saved is False
    assert arts.updates.covisit_pending_since == 100.0
    store.add_events(DS, [ev("n3", "t2", 6)])
    assert uu.update_users(arts, store, ["n3"], folder, now=200.0).covisit_saved is True  # 3 users
    assert (arts.updates.covisit_base, arts.updates.covisit_pending_since) == ({}, None)
    assert CoVisitation.load(folder / "covisit.json").cooc == arts.covisit.cooc
    store.add_events(DS, [ev("n4", "g2", 6)])
    assert uu.update_users(arts, store, ["n4"], folder, now=300.0).covisit_saved is False
    store.add_events(DS, [ev("n5", "g2", 7)])
    assert uu.update_users(arts, store, ["n5"], folder, now=300.0 + uu.COVISIT_SAVE_EVERY_S).covisit_saved is True


def test_a_deleted_user_leaves_no_trace_on_disk_and_can_come_back(arts: DatasetArtifacts, store: EventStore,
                                                                  folder: Path, tmp_path: Path) -> None:
    store.add_events(DS, [ev("n1", "g1", 5), ev("n1", "m1", 6)])
    uu.update_users(arts, store, ["n1"], folder, added_events=2)
    assert "n1" in (folder / "updates.json").read_text()  # its unsaved co-visitation base
    n = store.delete_user(DS, "n1")
    assert drop_user_from_artifacts(arts, "n1", folder, events_removed=n) is True
    assert drop_user_from_artifacts(arts, "n1", folder, events_removed=0) is False
    for name in ("updates.json", "user_items.json", "users/ids.json"):
        assert "n1" not in (folder / name).read_text(), name
    assert_as_built(load(store, folder), store, tmp_path)
    added = store.add_events(DS, [ev("n1", "c2", 8)])
    uu.update_users(arts, store, ["n1"], folder, added_events=added)
    assert arts.user_items["n1"] == ["c2"]
    assert_as_built(arts, store, tmp_path)


@pytest.mark.parametrize("process_lives_on", [False, True])
def test_a_failed_save_mid_update_is_repaired(arts: DatasetArtifacts, store: EventStore, folder: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              process_lives_on: bool) -> None:
    added = store.add_events(DS, [ev("n1", "g1", 5), ev("u1", "g2", 9)])
    real_save = VectorIndex.save

    def disk_full(self: VectorIndex, where: Path) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(VectorIndex, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        uu.update_users(arts, store, ["n1", "u1"], folder, added_events=added)
    assert arts.user_items["n1"] == ["g1"]  # serving already has the users
    assert (arts.updates.dirty, arts.updates.last_error, arts.updates.pending) == (
        True, "OSError: No space left on device", {"n1", "u1"})
    assert json.loads((folder / "updates.json").read_text())["dirty"] is True
    assert "n1" not in (folder / "user_items.json").read_text()
    monkeypatch.setattr(VectorIndex, "save", real_save)  # the disk has room again
    if process_lives_on:  # the next update retries the pending users and rewrites every file
        uu.update_users(arts, store, [], folder)
        assert (arts.updates.pending, arts.updates.last_error, arts.updates.dirty) == (set(), None, False)
        assert_as_built(arts, store, tmp_path)
    # else the process died: the next one rebuilds the user side from the store (no re-embedding)
    back = load(store, folder)
    assert back.updates.dirty is False and not json.loads((folder / "updates.json").read_text())["dirty"]
    assert_as_built(back, store, tmp_path)


@pytest.mark.parametrize("legacy", [False, True])
def test_events_stored_while_not_loaded_are_caught_up_on_load(arts: DatasetArtifacts, store: EventStore,
                                                             folder: Path, tmp_path: Path, legacy: bool) -> None:
    """Events stored by another process, or while this one had not loaded the dataset (and
    artifacts built before updates.json existed: `legacy`) reach the indexes on the next load."""
    if legacy:
        (folder / "updates.json").unlink()
    store.add_events(DS, [ev("n1", "c1", 5), ev("u3", "m2", 9)])
    back = load(store, folder)
    assert back.user_items["n1"] == ["c1"] and back.user_index.vector("n1") is not None
    assert back.updates.users_updated == 2
    assert_as_built(back, store, tmp_path)
    assert load(store, folder).updates.events == 13 + 2  # recorded: the next load reads no events


def test_deferred_saves_wait_for_a_bound_and_a_crash_in_between_catches_up(arts: DatasetArtifacts, store: EventStore,
                                                                            folder: Path, tmp_path: Path) -> None:
    """The API's `defer=True`: changes serve at once, the files follow at `SAVE_EVERY_S` (or
    `SAVE_EVERY_USERS`, a delete, `flush`); a process killed in between leaves the last whole
    generation, and loading catches up from the store to what a fresh build gives."""
    on_disk = (folder / "user_items.json").read_text()
    t = 1_000_000.0
    n = store.add_events(DS, [ev("n1", "g1", 5)])
    uu.update_users(arts, store, ["n1"], folder, added_events=n, now=t, defer=True)
    assert arts.user_items["n1"] == ["g1"] and "n1" in arts.user_index.ids  # serving has it
    assert (folder / "user_items.json").read_text() == on_disk  # the files do not, yet
    assert (arts.updates.unsaved_users, arts.updates.unsaved_since, arts.updates.dirty) == (1, t, True)
    assert json.loads((folder / "updates.json").read_text())["dirty"] is False  # the disk generation is whole
    n = store.add_events(DS, [ev("n2", "g2", 6)])
    uu.update_users(arts, store, ["n2"], folder, added_events=n, now=t + uu.SAVE_EVERY_S - 1, defer=True)
    assert (folder / "user_items.json").read_text() == on_disk and arts.updates.unsaved_users == 2
    crashed = load(store, folder)  # killed now: the last saved generation plus a catch-up from the store
    assert_as_built(crashed, store, tmp_path)
    n = store.add_events(DS, [ev("n3", "g1", 7)])
    uu.update_users(arts, store, ["n3"], folder, added_events=n, now=t + uu.SAVE_EVERY_S, defer=True)
    assert {"n1", "n2", "n3"} <= set(json.loads((folder / "user_items.json").read_text()))  # the bound: saved
    assert (arts.updates.unsaved_users, arts.updates.unsaved_since, arts.updates.dirty) == (0, None, False)
    n = store.add_events(DS, [ev("n4", "g2", 8)])
    uu.update_users(arts, store, ["n4"], folder, added_events=n, now=t + uu.SAVE_EVERY_S + 1, defer=True)
    assert "n4" not in json.loads((folder / "user_items.json").read_text())
    assert uu.flush(arts, folder) is True and uu.flush(arts, folder) is False  # at shutdown; then nothing to do
    assert "n4" in json.loads((folder / "user_items.json").read_text())
    assert_as_built(load(store, folder), store, tmp_path)
