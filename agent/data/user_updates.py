"""Keeping a dataset's user-side retrieval artifacts current as events arrive (issue 17).

`build_artifacts` fits everything from the store once. After that, events stored through
``POST /v1/events`` (and deletions) change only the users they name, so those users are updated
in place instead of rebuilding:

* ``user_items`` and the user index (FAISS): the users' sequences are re-read from the store and
  their vectors recomputed (no re-embedding: a user vector is a mean of item vectors); a new
  user is appended, a changed one replaced, a deleted one (or one whose recent items are all
  outside the catalogue) removed.
* popularity: exact count deltas (`Popularity.updated`).
* Those files are saved on every update by default. The API defers them (``defer=True``): they
  are written once `SAVE_EVERY_USERS` users have changed or the oldest unsaved change is
  `SAVE_EVERY_S` old (checked at each update), at once after a deletion, and at shutdown
  (`flush`). Until then the files on disk are a whole, older generation whose recorded event
  count differs from the store's, so a restart catches up from the store (below). Writing
  ~0.5 MB of JSON, an index and four fsyncs per posted event was most of a write's time, and
  under load the queue behind the write lock.
* co-visitation: exact count deltas in memory at once (`CoVisitation.updated`), but its file is
  large (128 MB for Online Retail, 3.5-6 s to write), so it is saved on a bounded schedule: when
  `COVISIT_SAVE_EVERY_USERS` users have changed since the last save, when the oldest unsaved
  change is `COVISIT_SAVE_EVERY_S` old (checked at each update), and at once after a deletion
  (no trace of a deleted user stays on disk). Until then ``updates.json`` records, per changed
  user, the sequence the saved file counted, and loading replays those deltas.

``<index folder>/updates.json`` (`UpdateLog`) is the bookkeeping: how many store events the
artifacts reflect, when they last changed, and a ``dirty`` flag set before the files of an
update are written and cleared after. Every file is replaced atomically (`retrieval.files`), so
a crash leaves whole files; a crash between files leaves ``dirty`` set, and the next load
rebuilds the user side from the store (no re-embedding; co-visitation refitted: about a minute
for Online Retail). A load whose event count differs from the store's (events stored while the
artifacts were not loaded, or by another process) re-reads the sequences and updates the users
that differ.

Callers hold the dataset's index lock: updates are not safe to run concurrently with each other.
Readers need no lock: each artifact is replaced by a new object, never changed in place.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.data.candidates import user_vector
from agent.data.store import EventStore
from agent.domain.errors import UnknownUserError
from agent.domain.schemas import BehaviorEvent
from retrieval.covisit import CoVisitation
from retrieval.files import write_atomic
from retrieval.index import VectorIndex
from retrieval.popularity import Popularity

if TYPE_CHECKING:
    from agent.data.artifacts import DatasetArtifacts

log = logging.getLogger(__name__)

UPDATES_FILE = "updates.json"
FORMAT = "shoplens.user-updates"
# co-visitation's file is re-saved once this many users changed since its last save, or once the
# oldest unsaved change is this old (seconds), checked at each update. A restart in between loses
# nothing (the deltas are replayed); the bound caps how many it replays.
COVISIT_SAVE_EVERY_USERS = 500
COVISIT_SAVE_EVERY_S = 3600.0
# With ``defer=True`` (the API), the other files are saved once this many users changed since
# their last save, or once the oldest unsaved change is this old (seconds).
SAVE_EVERY_USERS = 200
SAVE_EVERY_S = 10.0
USER_VECTOR_ITEMS = 50  # a user vector is the recency-weighted mean of the last 50 item vectors


@dataclass
class UpdateLog:
    """What ``updates.json`` records about a dataset's incremental updates, plus the in-memory
    state /readyz reports.

    Attributes:
        events: store events (all types) the artifacts reflect; None: unknown.
        updated_at: unix seconds of the last incremental update; None: none since the build.
        users_updated: users added, changed or removed incrementally since the build.
        covisit_base: user -> the sequence ``covisit.json`` counted for them ([] none), for every
            user changed since that file was saved.
        covisit_pending_since: unix seconds of the oldest change ``covisit.json`` lacks.
        dirty: an update's files are being written (on disk: a crash happened mid-update).
        pending: stored ids whose update has not completed (in memory only; retried by the next).
        pending_events: the store events those updates added to `events` (in memory only).
        last_error: why the last update failed, None after a success (in memory only).
        unsaved_users: users changed in memory since the files were last saved (``defer``).
        unsaved_since: unix seconds of the oldest of those changes.
    """

    events: int | None = None
    updated_at: float | None = None
    users_updated: int = 0
    covisit_base: dict[str, list[str]] = field(default_factory=dict)
    covisit_pending_since: float | None = None
    dirty: bool = False
    pending: set[str] = field(default_factory=set)
    pending_events: int = 0
    last_error: str | None = None
    unsaved_users: int = 0
    unsaved_since: float | None = None

    def save(self, folder: Path) -> None:
        """Write ``updates.json`` atomically (without the in-memory fields)."""
        body = {k: v for k, v in asdict(self).items() if k not in _IN_MEMORY}
        write_atomic(folder / UPDATES_FILE, json.dumps({"format": FORMAT, "version": 1} | body))

    @classmethod
    def load(cls, folder: Path) -> UpdateLog | None:
        """The saved log; None when the artifacts were built before this file existed.

        A file that cannot be read as a log comes back ``dirty`` (the user side is rebuilt
        from the store), with a warning.
        """
        path = folder / UPDATES_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            if raw.pop("format", None) != FORMAT or raw.pop("version", None) != 1:
                raise ValueError("not a ShopLens update log of version 1")
            return cls(**raw)
        except (ValueError, TypeError) as e:
            log.warning("%s unreadable (%s): the user-side artifacts are rebuilt from the store", path, e)
            return cls(dirty=True)


_IN_MEMORY = ("pending", "pending_events", "last_error", "unsaved_users", "unsaved_since")


@dataclass(frozen=True)
class UpdateReport:
    """What one update changed: user ids added to, changed in and removed from `user_items`,
    the changed users left out of the user index (cold start: no recent catalogue item), and
    whether ``covisit.json`` was re-saved."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    cold_start: list[str]
    covisit_saved: bool
    seconds: float


def item_sequences(events: Iterable[BehaviorEvent]) -> dict[str, list[str]]:
    """user id -> item ids, oldest first, consecutive repeats collapsed: what every artifact
    counts. `events` must be in time order per user (`EventStore.iter_events` order)."""
    out: dict[str, list[str]] = {}
    for e in events:
        seq = out.setdefault(e.user_id, [])
        if not seq or seq[-1] != e.item_id:
            seq.append(e.item_id)
    return out


def build_user_index(user_items: Mapping[str, Sequence[str]], item_index: VectorIndex) -> VectorIndex:
    """A FAISS index of user vectors (recency-weighted mean of each user's last 50 item vectors);
    users with no indexed item are left out (cold start)."""
    uids, uvecs = [], []
    for uid, items in user_items.items():
        v = user_vector(list(items)[-USER_VECTOR_ITEMS:], item_index)
        if v is not None:
            uids.append(uid)
            uvecs.append(v)
    uarr = np.stack(uvecs) if uvecs else np.zeros((0, item_index.manifest.dim), np.float32)
    m = item_index.manifest
    return VectorIndex.build(uids, uarr, name="users", embedder=m.embedder, content_hash=m.catalogue_hash)


def apply_sequences(arts: DatasetArtifacts, sequences: Mapping[str, Sequence[str]], folder: Path, *,
                    events: int | None = None, now: float | None = None, defer: bool = False) -> UpdateReport:
    """Give these users these sequences in `arts` (in memory, then saved under `folder`).

    Args:
        sequences: user id -> the user's whole item sequence now (`item_sequences` of their
            stored events); ``[]``: the user has no events (deleted). Users whose sequence is
            unchanged cost nothing.
        events: the store's event count after the change (recorded in ``updates.json``);
            None keeps the recorded one.
        now: unix seconds (tests pin it); default the clock.
        defer: save the files only when a bound is reached (`SAVE_EVERY_USERS`, `SAVE_EVERY_S`,
            a deletion); else on every update.

    Raises:
        OSError: a file could not be written. The in-memory artifacts are already updated and
            ``dirty`` stays set (on disk too), so the next update rewrites every file and a
            restart rebuilds the user side from the store.
    """
    t0, now = time.perf_counter(), time.time() if now is None else now
    ulog = arts.updates
    changes = {u: list(s) for u, s in sequences.items() if arts.user_items.get(u, []) != list(s)}
    added = sorted(u for u in changes if u not in arts.user_items)
    removed = sorted(u for u, s in changes.items() if not s)
    cold: list[str] = []
    if changes:
        ulog.dirty = True  # in memory until saved below: the files on disk are the last generation
        ulog.unsaved_users += len(changes)
        ulog.unsaved_since = ulog.unsaved_since or now
        pairs = [(arts.user_items.get(u, []), s) for u, s in changes.items()]
        user_items = {u: s for u, s in arts.user_items.items() if u not in changes}
        user_items.update({u: s for u, s in changes.items() if s})
        rows: dict[str, np.ndarray] = {}
        for u, s in changes.items():
            v = user_vector(s[-USER_VECTOR_ITEMS:], arts.item_index) if s else None
            if v is not None:
                rows[u] = v
            elif s:
                cold.append(u)
        index = arts.user_index.removed([u for u in changes if u not in rows])
        if rows:
            index = index.upserted(list(rows), np.stack(list(rows.values())))
        popularity, covisit = arts.popularity.updated(pairs), arts.covisit.updated(pairs)
        for u, s in changes.items():
            if ulog.covisit_base.setdefault(u, arts.user_items.get(u, [])) == s:  # back to what covisit.json counted
                del ulog.covisit_base[u]
        if ulog.covisit_base and ulog.covisit_pending_since is None:
            ulog.covisit_pending_since = now
        # readers pick up each new object as it lands; none is changed in place
        arts.user_items, arts.user_index, arts.popularity, arts.covisit = user_items, index, popularity, covisit
        ulog.users_updated += len(changes)
        ulog.updated_at = now
    save_covisit = bool(ulog.covisit_base) and (
        bool(removed) or len(ulog.covisit_base) >= COVISIT_SAVE_EVERY_USERS
        or now - (ulog.covisit_pending_since or now) >= COVISIT_SAVE_EVERY_S)
    save_now = not defer or bool(removed) or ulog.unsaved_users >= SAVE_EVERY_USERS or (
        ulog.unsaved_since is not None and now - ulog.unsaved_since >= SAVE_EVERY_S)
    if ulog.dirty and save_now:  # this update's changes, earlier deferred ones, or a failed save
        ulog.save(folder)  # dirty on disk: a crash from here until the final save makes the next load resync
        arts.user_index.save(folder / "users")
        arts.popularity.save(folder / "popularity.json")
        write_atomic(folder / "user_items.json", json.dumps(arts.user_items))
        if save_covisit:
            arts.covisit.save(folder / "covisit.json")
            ulog.covisit_base, ulog.covisit_pending_since = {}, None
        done = replace(ulog, events=ulog.events if events is None else events, dirty=False)
        done.save(folder)  # in memory only once it is on disk: a failed save leaves `dirty` set
        ulog.events, ulog.dirty, ulog.unsaved_users, ulog.unsaved_since = done.events, False, 0, None
    elif ulog.dirty:  # deferred: the count the artifacts in memory reflect, on disk once they are saved
        ulog.events = ulog.events if events is None else events
    elif events is not None and events != ulog.events:  # only the count moved
        if not defer:  # deferred, a restart finds the count moved, re-reads and finds nothing to change
            replace(ulog, events=events).save(folder)
        ulog.events = events
    return UpdateReport(added=added, changed=sorted(set(changes) - set(added) - set(removed)), removed=removed,
                        cold_start=sorted(cold), covisit_saved=save_covisit, seconds=time.perf_counter() - t0)


def update_users(arts: DatasetArtifacts, store: EventStore, user_ids: Iterable[str], folder: Path, *,
                 added_events: int = 0, now: float | None = None, defer: bool = False) -> UpdateReport:
    """Re-read these users' events from the store and apply their sequences (`apply_sequences`),
    together with any users an earlier failed update left pending.

    Args:
        user_ids: stored user ids whose events changed (added or deleted).
        added_events: events the store gained (negative: lost) since the artifacts' recorded
            count; keeps ``updates.json``'s count in step without counting the store.

    Raises:
        OSError, sqlite3.Error: the update failed; the users stay pending (`UpdateLog.pending`)
            and `UpdateLog.last_error` says why.
    """
    ulog = arts.updates
    ulog.pending.update(user_ids)
    ulog.pending_events += added_events
    users = sorted(ulog.pending)
    try:
        seqs = {}
        for u in users:
            try:
                evs = store.user_events(arts.dataset, u)
            except UnknownUserError:  # deleted since
                evs = []
            seqs[u] = item_sequences(evs).get(u, [])
        events = None if ulog.events is None else ulog.events + ulog.pending_events
        report = apply_sequences(arts, seqs, folder, events=events, now=now, defer=defer)
    except Exception as e:
        ulog.last_error = f"{type(e).__name__}: {e}"
        raise
    ulog.pending.difference_update(users)
    ulog.pending_events, ulog.last_error = 0, None
    return report


def flush(arts: DatasetArtifacts, folder: Path) -> bool:
    """Save what deferred updates left unsaved (at shutdown). Returns whether anything was written.

    Raises:
        OSError: a file could not be written (``dirty`` stays set).
    """
    if not arts.updates.dirty:
        return False
    apply_sequences(arts, {}, folder)
    return True


def resync_from_store(arts: DatasetArtifacts, store: EventStore, folder: Path) -> str:
    """Rebuild the user side of `arts` (user_items, user index, popularity, co-visitation with
    its saved configuration) from the store, and save it: after a crash mid-update (``dirty``).
    No re-embedding; the co-visitation refit dominates (about a minute for Online Retail).

    Returns:
        What was done, for the log.

    Raises:
        OSError: a file could not be written.
    """
    seqs = item_sequences(store.iter_events(arts.dataset))
    arts.user_items, arts.user_index = seqs, build_user_index(seqs, arts.item_index)
    arts.popularity = Popularity().fit(seqs.values())
    arts.covisit = CoVisitation(arts.covisit.config).fit(seqs.values())
    arts.covisit.save(folder / "covisit.json")
    arts.updates = UpdateLog(events=store.counts(arts.dataset)["events"], dirty=True)
    apply_sequences(arts, {}, folder)  # writes the other files, then the clean log
    return f"an update was interrupted: user side rebuilt from the store ({len(seqs)} users)"


def catch_up(arts: DatasetArtifacts, store: EventStore, folder: Path, saved: UpdateLog | None) -> str | None:
    """Bring freshly loaded, consistent artifacts up to the store: replay the co-visitation
    changes its file lacks, then, when the store's event count differs from the one `saved`
    records (or none is recorded: artifacts built before ``updates.json`` existed), re-read every
    sequence and update the users that differ.

    Returns:
        What was done, for the log; None when the artifacts were current.

    Raises:
        OSError: a file could not be written.
    """
    arts.updates = saved or UpdateLog()
    if arts.updates.covisit_base:
        arts.covisit = arts.covisit.updated(
            [(base, arts.user_items.get(u, [])) for u, base in arts.updates.covisit_base.items()])
    before, total = arts.updates.events, store.counts(arts.dataset)["events"]
    if before == total:
        return None
    seqs = item_sequences(store.iter_events(arts.dataset))
    stale = {u: s for u, s in seqs.items() if arts.user_items.get(u) != s}
    stale.update({u: [] for u in arts.user_items if u not in seqs})
    r = apply_sequences(arts, stale, folder, events=total)
    return (f"the store has {total} events, the artifacts reflected {'an unknown number' if before is None else before}: "
            f"{len(r.added)} users added, {len(r.changed)} changed, {len(r.removed)} removed")


def update_status(ulog: UpdateLog, users_indexed: int) -> dict[str, Any]:
    """The /readyz view of one loaded dataset's updates (`agent.app.results.IndexUpdates` fields)."""
    when = None if ulog.updated_at is None else datetime.fromtimestamp(ulog.updated_at, UTC).isoformat()
    return {"users_indexed": users_indexed, "users_pending": len(ulog.pending), "last_update": when,
            "users_updated": ulog.users_updated, "covisit_unsaved_users": len(ulog.covisit_base),
            "covisit_save_bound": f"{COVISIT_SAVE_EVERY_USERS} users or {COVISIT_SAVE_EVERY_S:.0f} s",
            "unsaved_users": ulog.unsaved_users,
            "last_error": ulog.last_error}
