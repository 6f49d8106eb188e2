"""Two API replicas on one PostgreSQL store: the real app under uvicorn, twice, each with its own
workspace and `SHOPLENS_DATABASE_URL` pointing at a real PostgreSQL server (tests/pg.py).

What one replica ingests the other reads, answers from and deletes; nothing lands in either
workspace's SQLite file. Skips when PostgreSQL is not installed (fails with
SHOPLENS_REQUIRE_POSTGRES=1, as on CI).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from agent.app.runtime import Runtime
from agent.data.store import EventStore
from tests.test_api import AUTH, DATASET, USER, agent_settings, assert_envelope, event, serve_app


def test_two_api_replicas_share_one_postgresql_store(tmp_path: Path, pg_url: str) -> None:
    ws_a, ws_b = tmp_path / "a", tmp_path / "b"
    loader = Runtime(agent_settings(ws_a, database_url=pg_url))  # `shoplens ingest` on one host
    report = loader.ingest(DATASET, show_progress=False)
    assert report.events_new > 0
    with (serve_app(ws_a, database_url=pg_url) as url_a, serve_app(ws_b, database_url=pg_url) as url_b,
          httpx.Client(base_url=url_a, headers=AUTH, timeout=60) as a,
          httpx.Client(base_url=url_b, headers=AUTH, timeout=60) as b):
        (d,) = [x for x in b.get("/v1/datasets").json()["datasets"] if x["name"] == DATASET]
        assert d["events"] == report.events_new

        # written through A, read through B
        r = a.post("/v1/events", json={"dataset": DATASET, "events": [event(i, user_id="pg-1") for i in range(3)]})
        assert r.status_code == 200 and r.json()["stored"] == 3, r.text
        got = b.get("/v1/users/pg-1/events", params={"dataset": DATASET}).json()
        assert got["total"] == 3 and [e["event_id"] for e in got["events"]] == r.json()["event_ids"]

        # one batch sent to both replicas at once is stored once
        batch = [event(i, user_id="pg-2") for i in range(100)]
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda c: c.post("/v1/events", json={"dataset": DATASET, "events": batch}),
                                 [a, b] * 3))
        assert [o.status_code for o in outs] == [200] * 6
        assert sum(o.json()["stored"] for o in outs) == 100
        assert a.get("/v1/users/pg-2/events", params={"dataset": DATASET}).json()["total"] == 100

        # B answers from the shared store with indexes it built itself
        r = b.post("/v1/next-item", json={"dataset": DATASET, "user_id": USER, "k": 3, "use_llm": False})
        assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text

        # a NUL (PostgreSQL text cannot hold one) refuses that event only, never a 500
        r = a.post("/v1/events", json={"dataset": DATASET, "events": [event(0, user_id="pg-3"),
                                                                      event(1, user_id="pg\x003")]})
        assert r.status_code == 200 and (r.json()["stored"], r.json()["rejected"]) == (1, 1), r.text
        assert r.json()["errors"][0]["param"] == "events[1].user_id"
        assert_envelope(b.get("/v1/users/pg%003/events", params={"dataset": DATASET}), 422, param="user_id")

        # deleted through B, gone through A
        assert b.delete("/v1/users/pg-1", params={"dataset": DATASET}).json()["deleted_events"] == 3
        assert_envelope(a.get("/v1/users/pg-1/events", params={"dataset": DATASET}), 404, code="unknown_user")

    assert not (ws_a / "shoplens.sqlite3").exists() and not (ws_b / "shoplens.sqlite3").exists()
    store = EventStore(url=pg_url)
    try:
        assert store.counts(DATASET)["events"] == report.events_new + 101
    finally:
        store.close()
