"""kill -9 of the API process during event ingestion (issue 17, guarantee 2), on a real
`shoplens serve` subprocess over the fixture workspace, no model: the SQLite store passes
``PRAGMA integrity_check``, every acknowledged batch is stored whole, no batch is half-stored, and
the restarted API serves the events and takes new ones. The same function is the `ingest-kill`
part of ``python -m bench.reliability``."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from agent.app.runtime import Runtime
from bench.reliability import KEY, ingest_kill
from bench.server import free_port
from tests.test_api import DATASET, FIXTURES, agent_settings

pytestmark = pytest.mark.slow


def test_kill_9_during_ingestion_loses_no_acknowledged_event_and_stores_no_half_batch(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    Runtime(agent_settings(ws)).ingest(DATASET, show_progress=False)
    with sqlite3.connect(ws / "shoplens.sqlite3") as c:
        users = [r[0] for r in c.execute("SELECT DISTINCT user_id FROM events LIMIT 5")]
        items = [r[0] for r in c.execute("SELECT item_id FROM items LIMIT 20")]
    env = {**os.environ, "SHOPLENS_API_KEYS": KEY, "SHOPLENS_RATE_LIMIT_RPS": "0", "SHOPLENS_DATA_DIR": str(FIXTURES),
           "SHOPLENS_EMBEDDER": "hashing-64", "SHOPLENS_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
           "SHOPLENS_LLM_DIALECT": "llamacpp"}
    res = ingest_kill(ws, env, DATASET, [*users, "new-user-a", "new-user-b"], items, writers=3, batch=100,
                      kill_after_acks=4)
    assert res["batches_acked"] >= 4, res
    assert res["integrity"] == "ok"
    assert res["acked_missing"] == 0 and res["half_stored"] == 0, res
    assert res["readback_missing"] == 0 and res["post_after_restart"] == 200, res
    assert res["ok"] is True
