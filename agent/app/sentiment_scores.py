"""Stored review scores: a batch re-run scores only what is new (issue 20).

Each model-made `SentimentResult` is kept under `SentimentAnalyzer.score_key` (sha256 of the raw
text, the model's sha256, the prompts and their shas, the config and aspects on/off), in
``<workspace>/sentiment_scores.sqlite3``. A re-run on an unchanged file reads every answer back
(no model call); a grown file scores only its new rows; a new prompt version or model scores
everything again. Lexicon (degraded) answers are never stored, so they are retried once the
model is back. Written as each review is judged, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from agent.data.sqlite import LockedSqlite
from agent.domain.predictions import SentimentResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    key TEXT PRIMARY KEY,           -- SentimentAnalyzer.score_key: text + model + prompts + config
    result TEXT NOT NULL,           -- SentimentResult JSON
    created_at REAL NOT NULL        -- unix seconds
);
"""

FILE_NAME = "sentiment_scores.sqlite3"
REUSED_NOTE = "stored score reused (same text, model, prompts and settings): no model call"


class SentimentScoreStore(LockedSqlite):
    """Model-made review scores by key (thread-safe; see the module docstring).

    Args:
        path: the SQLite file, usually ``settings.workspace / FILE_NAME``.
    """

    def __init__(self, path: Path):
        super().__init__(path, _SCHEMA)

    def get_many(self, keys: Sequence[str]) -> dict[str, SentimentResult]:
        """The stored results among `keys` (absent keys are left out), each with `REUSED_NOTE`
        added to its ``meta.notes``."""
        out: dict[str, SentimentResult] = {}
        uniq = list(dict.fromkeys(keys))
        with self._lock:
            for i in range(0, len(uniq), 500):  # SQLite's bound-parameter limit
                chunk = uniq[i:i + 500]
                rows = self._conn.execute(
                    f"SELECT key, result FROM scores WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                for key, raw in rows:
                    r = SentimentResult.model_validate_json(raw)
                    r.meta.notes.append(REUSED_NOTE)
                    out[key] = r
        return out

    def put(self, key: str, result: SentimentResult) -> bool:
        """Keep `result` under `key` when the model made it (not degraded); True when kept."""
        if result.source != "model" or result.meta.degraded:
            return False
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO scores (key, result, created_at) VALUES (?, ?, ?)",
                               (key, result.model_dump_json(), time.time()))
        return True

    def count(self) -> int:
        """How many scores are stored."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])
