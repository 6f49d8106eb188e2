"""One SQLite connection behind a lock: the small stores beside the event store (feedback,
precomputed answers) share this opening and closing."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class LockedSqlite:
    """A WAL-mode SQLite file with `schema` applied, used through one connection
    (``check_same_thread=False``) behind `_lock`: thread-safe; call it from a worker thread in
    async code.

    Args:
        path: the database file (its folder is created).
        schema: SQL run once at open (``CREATE TABLE IF NOT EXISTS ...``).
    """

    def __init__(self, path: Path, schema: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._lock, self._conn:
            self._conn.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
