"""Stored (precomputed) next-item answers, what makes one fresh, and the queue of users to refresh.

An entry is one answer per (dataset, stored user id, k): the `NextItemPrediction` as JSON, the
hash of the user's events it was made from (`EventStore.user_events_sha256`), the pipeline
version it was made under (`pipeline_version`), when it was computed, whether it was made with
the model, and a stale flag. An entry is fresh while the user's events hash and the pipeline
version still match and the flag is clear. The flag is set when new events for the user arrive
(`AnswerStore.mark_stale`, from ``POST /v1/events``) and for an answer that wanted the model and
was made without it (degraded); a refresh clears it.

The refresh queue holds one row per user to recompute (`agent.app.precompute.RefreshWorker`
pops it). A user marked again while being refreshed gets a new generation, so the refresh that
saw the old one does not remove the row and the user is refreshed once more.

Storage: SQLite in WAL mode, ``<workspace>/answers.sqlite3``, one connection shared by every
thread behind a lock (as `agent.app.feedback.FeedbackStore`): call it from a worker thread in
async code.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from agent.app.progressive import NextItemAnswer
from agent.data.candidates import DEFAULT_WEIGHTS
from agent.data.sqlite import LockedSqlite
from agent.domain.predictions import NextItemPrediction
from agent.llm.prompting import load_prompt
from agent.tasks.next_item import NextItemConfig

# Bump when pipeline code changes answers while every input of `pipeline_version` stays the same.
PIPELINE_FORMAT = 1
_CHUNK = 500  # ids per IN (...) list: well under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    dataset TEXT NOT NULL,
    user_id TEXT NOT NULL,            -- the stored (pseudonymised when configured) id
    k INTEGER NOT NULL,
    use_model INTEGER NOT NULL,       -- 1: asked for the model's ranking and reasons
    prediction TEXT NOT NULL,         -- NextItemPrediction JSON
    events_sha256 TEXT NOT NULL,      -- the user's events when it was computed
    pipeline_version TEXT NOT NULL,   -- pipeline_version() when it was computed
    computed_at REAL NOT NULL,        -- unix seconds
    stale INTEGER NOT NULL DEFAULT 0, -- 1: new events arrived, or made without the model it asked for
    PRIMARY KEY (dataset, user_id, k)
);
CREATE TABLE IF NOT EXISTS refresh_queue (
    dataset TEXT NOT NULL,
    user_id TEXT NOT NULL,
    enqueued_at REAL NOT NULL,        -- unix seconds, the first mark since the last refresh
    generation INTEGER NOT NULL DEFAULT 0,  -- bumped by every later mark
    attempts INTEGER NOT NULL DEFAULT 0,    -- refreshes that could not reach the model
    not_before REAL NOT NULL DEFAULT 0,     -- unix seconds: retry no earlier
    PRIMARY KEY (dataset, user_id)
);
CREATE INDEX IF NOT EXISTS refresh_due ON refresh_queue (not_before, enqueued_at);
"""


def pipeline_version(config: NextItemConfig, *, model: str | None, fusion_weights: Mapping[str, float] | None,
                     index_manifest_sha256: str | None, llm_weight: float = 0.0) -> str:
    """A short hash of everything besides the user's own events that decides a next-item answer.
    A stored answer made under another version is stale.

    What goes in:

    * `PIPELINE_FORMAT` (bumped by hand when pipeline code changes answers);
    * the `NextItemConfig` fields that change an answer: k, repurchase, n_candidates, window,
      source_weights, seed, use_llm_ranking and explain; when the model ranks, llm_scorer,
      llm_weight, permutations (verbalizer only) and the scorer's prompt; when it explains,
      max_attempts, the explanation prompt and its length caps. Prompts go in by name and content sha256, so an
      edited template counts even under its old name;
    * `model`: the packaged GGUF's sha256, or the served model's id; only when the model ranks or
      explains (an answer without the model does not depend on it);
    * `fusion_weights`: the dataset's fitted source weights (``fusion.json`` from
      ``shoplens train``); None: the hand-set `DEFAULT_WEIGHTS`, which go in by value (a
      default changed or a source added counts);
    * `index_manifest_sha256`: sha256 of the dataset's item-index manifest (embedder, catalogue
      hash), so an index rebuilt for another catalogue or embedder counts;
    * `llm_weight`: the dataset's served model weight (``llm_weight.json``), used when
      ``config.llm_weight`` is None; at 0 the model does not rank, so nothing of the ranking
      call goes in.

    Left out: `explain_lane` (where the call waits, not what it says), timeouts, the model guard's
    bounds, and other users' events. Those move the similar-user, co-visitation and popularity
    sources a little with every `POST /v1/events` batch (`agent.data.user_updates`); counting
    them would make every stored answer stale on every batch, so a stored answer follows its own
    user's events, and a catalogue or embedder change through the manifest.

    Returns:
        16 hex digits.
    """
    c = config
    weight = c.weight_for(llm_weight)
    ranks = c.use_llm_ranking and weight > 0
    parts: dict[str, object] = {
        "format": PIPELINE_FORMAT, "k": c.k, "repurchase": c.repurchase, "n_candidates": c.n_candidates,
        "window": c.window, "source_weights": c.source_weights, "seed": c.seed,
        "use_llm_ranking": ranks, "explain": c.explain,
        "fusion_weights": dict(fusion_weights) if fusion_weights is not None else {"defaults": DEFAULT_WEIGHTS},
        "index_manifest": index_manifest_sha256,
    }
    if ranks:
        parts |= {"llm_scorer": c.llm_scorer, "llm_weight": weight, "rank_prompt": prompt_id(c.scorer_prompt)}
        if c.llm_scorer == "verbalizer":
            parts["permutations"] = c.permutations
    if c.explain:
        parts |= {"max_attempts": c.max_attempts, "explain_prompt": prompt_id(c.explain_prompt),
                  "explain_max_words": c.explain_max_words, "summary_max_chars": c.summary_max_chars}
    if ranks or c.explain:
        parts["model"] = model
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prompt_id(ref: str) -> str:
    """A prompt by name and content: ``"next_item_rank.v1@<sha256, 16 hex>"`` (an edited template
    counts even under its old name)."""
    return f"{ref}@{load_prompt(ref).sha256}"


class StoredAnswer(NextItemAnswer):
    """A precomputed next-item answer (``shoplens precompute``, or the refresh worker), served
    from SQLite in milliseconds. `meta.notes` says the same in words."""

    computed_at: float = Field(description="when it was computed, unix seconds")
    stale: bool = Field(description="true: the user's events or the pipeline changed since, or it was made "
                        "without the model it asked for; a refresh is queued")
    stale_reason: str | None = Field(default=None, description="why it is stale")


class BatchError(BaseModel):
    """One user of a batch that got no answer."""

    user_id: str
    code: str = Field(description="unknown_user, invalid_value, ...: the codes of the error envelope")
    message: str


class NextItemBatch(BaseModel):
    """Next-item answers for many users: one per user that has one, in request order, and one
    error per user that has none (one bad user does not fail the batch)."""

    answers: list[StoredAnswer | NextItemAnswer]
    errors: list[BatchError]


@dataclass
class StoredEntry:
    """One stored answer and what it was made from."""

    dataset: str
    user_id: str
    k: int
    use_model: bool
    prediction: NextItemPrediction
    events_sha256: str
    pipeline_version: str
    computed_at: float
    stale: bool


@dataclass
class QueuedUser:
    """One refresh queue row, as popped."""

    dataset: str
    user_id: str
    generation: int
    attempts: int


def stale_reason(entry: StoredEntry, events_sha256: str, version: str) -> str | None:
    """Why a stored answer is stale now, or None while it is fresh.

    Args:
        events_sha256: the user's events hash now (`EventStore.user_events_sha256`).
        version: `pipeline_version` of the served configuration now, for the entry's k and use of
            the model.
    """
    if entry.events_sha256 != events_sha256:
        return "the user's events changed since it was computed"
    if entry.pipeline_version != version:
        return "the pipeline changed since it was computed (configuration, prompts, model, fusion weights or index)"
    if entry.stale and entry.use_model and entry.prediction.meta.degraded:
        return f"made without the model it asked for ({entry.prediction.meta.degraded_reason})"
    if entry.stale:
        return "new events were sent for the user"
    return None


class AnswerStore(LockedSqlite):
    """Stored next-item answers and the refresh queue (SQLite, WAL). Thread-safe: one connection
    (``check_same_thread=False``) behind a lock."""

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    # ---- answers ----------------------------------------------------------------------------
    def put(self, dataset: str, user_id: str, pred: NextItemPrediction, *, use_model: bool, events_sha256: str,
            version: str, stale: bool = False, computed_at: float | None = None) -> None:
        """Store (or replace) the answer for (dataset, user_id, pred.k), committed before this returns."""
        at = time.time() if computed_at is None else computed_at
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers (dataset, user_id, k, use_model, prediction, events_sha256, "
                "pipeline_version, computed_at, stale) VALUES (?,?,?,?,?,?,?,?,?)",
                (dataset, user_id, pred.k, int(use_model), pred.model_dump_json(), events_sha256, version, at,
                 int(stale)))

    def get(self, dataset: str, user_id: str, k: int) -> StoredEntry | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLS} FROM answers WHERE dataset = ? AND user_id = ? AND k = ?",
                                     (dataset, user_id, k)).fetchone()
        return _entry(row) if row else None

    def entries(self, dataset: str, user_id: str) -> list[StoredEntry]:
        """Every stored answer of one user (one per k), by k."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLS} FROM answers WHERE dataset = ? AND user_id = ? ORDER BY k",
                                      (dataset, user_id)).fetchall()
        return [_entry(r) for r in rows]

    def clear_stale(self, dataset: str, user_id: str, k: int) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE answers SET stale = 0 WHERE dataset = ? AND user_id = ? AND k = ?",
                               (dataset, user_id, k))

    def count(self, dataset: str | None = None) -> int:
        where, args = ("WHERE dataset = ?", (dataset,)) if dataset is not None else ("", ())
        with self._lock:
            (n,) = self._conn.execute(f"SELECT COUNT(*) FROM answers {where}", args).fetchone()
        return int(n)

    def forget_user(self, dataset: str, user_ids: Sequence[str]) -> int:
        """Delete the stored answers and queued refreshes of these ids (a deleted user).

        Returns:
            How many answers were deleted.
        """
        n = 0
        with self._lock, self._conn:
            for chunk in _chunks(user_ids):
                marks = ",".join("?" * len(chunk))
                self._conn.execute(f"DELETE FROM refresh_queue WHERE dataset = ? AND user_id IN ({marks})",
                                   (dataset, *chunk))
                n += self._conn.execute(f"DELETE FROM answers WHERE dataset = ? AND user_id IN ({marks})",
                                        (dataset, *chunk)).rowcount
        return n

    # ---- the refresh queue ----------------------------------------------------------------------
    def mark_stale(self, dataset: str, user_ids: Sequence[str]) -> int:
        """Flag the stored answers of these users stale and queue them for a refresh; users with
        no stored answer are left alone (so an ingest stays cheap). A user already queued gets a
        new generation and its retry count reset (new events are worth another try at once).

        Returns:
            How many users were marked.
        """
        now, n = time.time(), 0
        with self._lock, self._conn:
            for chunk in _chunks(sorted(set(user_ids))):
                marks = ",".join("?" * len(chunk))
                self._conn.execute(f"UPDATE answers SET stale = 1 WHERE dataset = ? AND user_id IN ({marks})",
                                   (dataset, *chunk))
                cur = self._conn.execute(
                    "INSERT INTO refresh_queue (dataset, user_id, enqueued_at) "
                    f"SELECT DISTINCT dataset, user_id, ? FROM answers WHERE dataset = ? AND user_id IN ({marks}) "
                    "ON CONFLICT (dataset, user_id) DO UPDATE SET generation = generation + 1, attempts = 0, "
                    "not_before = 0", (now, dataset, *chunk))
                n += cur.rowcount
        return n

    def enqueue(self, dataset: str, user_id: str) -> None:
        """Queue one user for a refresh unless already queued (a stale answer was served)."""
        with self._lock, self._conn:
            self._conn.execute("INSERT OR IGNORE INTO refresh_queue (dataset, user_id, enqueued_at) VALUES (?,?,?)",
                               (dataset, user_id, time.time()))

    def next_due(self, now: float | None = None) -> QueuedUser | None:
        """The longest-waiting queued user whose retry time has come, or None (it stays queued
        until `done` or `retry_later`)."""
        t = time.time() if now is None else now
        with self._lock:
            row = self._conn.execute(
                "SELECT dataset, user_id, generation, attempts FROM refresh_queue WHERE not_before <= ? "
                "ORDER BY enqueued_at, dataset, user_id LIMIT 1", (t,)).fetchone()
        return QueuedUser(*row) if row else None

    def done(self, item: QueuedUser) -> bool:
        """Remove a refreshed user from the queue, unless it was marked again since it was popped.

        Returns:
            True when the row was removed.
        """
        with self._lock, self._conn:
            cur = self._conn.execute("DELETE FROM refresh_queue WHERE dataset = ? AND user_id = ? AND generation = ?",
                                     (item.dataset, item.user_id, item.generation))
            return cur.rowcount > 0

    def retry_later(self, item: QueuedUser, delay_s: float, max_attempts: int) -> bool:
        """Try this user again after `delay_s` seconds, or drop it after `max_attempts` tries (its
        answer stays stored, flagged stale, and is queued again when next served or marked).

        Returns:
            True when it stays queued.
        """
        with self._lock, self._conn:
            if item.attempts + 1 >= max_attempts:
                self._conn.execute("DELETE FROM refresh_queue WHERE dataset = ? AND user_id = ? AND generation = ?",
                                   (item.dataset, item.user_id, item.generation))
                return False
            self._conn.execute("UPDATE refresh_queue SET attempts = attempts + 1, not_before = ? "
                               "WHERE dataset = ? AND user_id = ?",
                               (time.time() + delay_s, item.dataset, item.user_id))
            return True

    def queued(self, dataset: str | None = None) -> int:
        where, args = ("WHERE dataset = ?", (dataset,)) if dataset is not None else ("", ())
        with self._lock:
            (n,) = self._conn.execute(f"SELECT COUNT(*) FROM refresh_queue {where}", args).fetchone()
        return int(n)


_COLS = "dataset, user_id, k, use_model, prediction, events_sha256, pipeline_version, computed_at, stale"


def _entry(row: tuple[Any, ...]) -> StoredEntry:
    dataset, user_id, k, use_model, pred, sha, version, at, stale = row
    return StoredEntry(dataset=dataset, user_id=user_id, k=int(k), use_model=bool(use_model),
                       prediction=NextItemPrediction.model_validate_json(pred), events_sha256=sha,
                       pipeline_version=version, computed_at=float(at), stale=bool(stale))


def _chunks(ids: Sequence[str]) -> list[Sequence[str]]:
    return [ids[i: i + _CHUNK] for i in range(0, len(ids), _CHUNK)]
