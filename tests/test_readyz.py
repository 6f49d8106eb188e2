"""/readyz reflects what can serve (issue 17): a dataset created after start (``POST /v1/events``
with ``create``) is reported with its own index state and never makes the instance unready; the
startup warm-up, and no dataset able to serve at all, do.

The app runs in-process (`TestClient`, lifespan included: the warm-up runs) over the fake model.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.app.runtime import Runtime
from agent.data.artifacts import DatasetArtifacts
from agent.domain.schemas import CatalogItem
from agent.settings import Settings
from tests.test_pii_every_task import CATALOG, DS, T0, FakeRuntime, _events
from ui.api import ApiSettings, create_app

AUTH = {"Authorization": "Bearer k"}
NEW = "new-shop"


class GatedRuntime(FakeRuntime):
    """Loading a dataset's indexes waits for `gate` (a slow warm-up); a dataset in `broken` fails."""

    def __init__(self, settings: Settings, broken: frozenset[str] = frozenset()):
        super().__init__(settings)
        self.gate = threading.Event()
        self.gate.set()
        self.broken = broken

    def artifacts(self, dataset: str) -> DatasetArtifacts:
        if dataset in self.broken:
            raise RuntimeError("index file is corrupt")
        assert self.gate.wait(30), "the test never opened the gate"
        return Runtime.artifacts(self, dataset)


def _runtime(ws: Path, datasets: tuple[str, ...] = (DS,), **kw: Any) -> GatedRuntime:
    r = GatedRuntime(Settings(workspace=ws, embedder="hashing-64", permutations=1, n_candidates=6,
                              model_retries=0, model_cooldown_s=0), **kw)
    for d in datasets:
        _catalogue(r, d)
        r.store.add_events(d, _events())
    return r


def _catalogue(rt: Runtime, dataset: str) -> None:
    """What `shoplens ingest` (another process, same workspace) writes: the catalogue."""
    rt.store.add_items(dataset, [CatalogItem(item_id=i, title=t, price=2.5, category="home")
                                 for i, t in CATALOG.items()])


def _client(rt: Runtime) -> TestClient:
    return TestClient(create_app(rt, ApiSettings(api_keys="k", rate_limit_rps=0, readyz_cache_s=0)))


def _ready(c: TestClient, timeout_s: float = 20.0) -> dict[str, Any]:
    """/readyz once it answers 200 (the warm-up has finished)."""
    deadline = time.monotonic() + timeout_s
    while (r := c.get("/readyz", headers=AUTH)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return dict(r.json())


def _new_events(n: int = 3) -> list[dict[str, Any]]:
    return [{"user_id": "n1", "item_id": i, "event_type": "purchase",
             "timestamp": (T0 + timedelta(days=d)).isoformat()} for d, i in enumerate(list(CATALOG)[:n])]


def test_a_dataset_created_through_the_api_does_not_make_the_instance_unready(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    with _client(rt) as c:
        assert _ready(c)["indexes"] == {DS: "ready"}
        r = c.post("/v1/events", json={"dataset": NEW, "events": _new_events(), "create": True}, headers=AUTH)
        assert r.status_code == 200 and r.json()["stored"] == 3, r.text

        # events only: nothing to index yet, said per dataset; the instance still serves DS
        r = c.get("/readyz", headers=AUTH)
        assert r.status_code == 200, r.text
        idx = r.json()["indexes"]
        assert idx[DS] == "ready" and idx[NEW].startswith("unusable: no catalogue"), idx
        assert c.post("/v1/next-item", json={"dataset": NEW, "user_id": "n1", "k": 2}, headers=AUTH
                      ).json()["error"]["code"] == "dataset_unusable"
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/next-item", json={"dataset": DS, "user_id": "17850", "k": 2}, headers=AUTH
                      ).status_code == 200

        # a catalogue arrives (`shoplens ingest` from another process): not built, built by the first request
        _catalogue(rt, NEW)
        r = c.get("/readyz", headers=AUTH)
        assert r.status_code == 200 and r.json()["indexes"] == {DS: "ready", NEW: "not built"}, r.text
        ds = {d["name"]: d for d in c.get("/v1/datasets", headers=AUTH).json()["datasets"]}
        assert (ds[NEW]["indexes"], ds[NEW]["indexes_ready"]) == ("not built", False)
        r = c.post("/v1/next-item", json={"dataset": NEW, "user_id": "n1", "k": 2}, headers=AUTH)
        assert r.status_code == 200 and r.json()["items"], r.text
        r = c.get("/readyz", headers=AUTH)
        assert r.status_code == 200 and r.json()["indexes"] == {DS: "ready", NEW: "ready"}, r.text
        # without a key: how many datasets are in which state, never their names
        anon = c.get("/readyz").json()
        assert (anon["indexes"], anon["indexes_by_state"], anon["names_hidden"]) == ({}, {"ready": 2}, True)


def test_the_startup_warm_up_holds_readiness_until_the_stored_datasets_are_loaded(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    rt.gate.clear()
    with _client(rt) as c:
        try:
            r = c.get("/readyz", headers=AUTH)
            assert r.status_code == 503, r.text
            assert f"indexes {DS}:" in r.json()["error"]["message"], r.text
            anon = c.get("/readyz").json()["error"]["message"]
            assert "indexes <dataset>:" in anon and DS not in anon, anon
            assert "startup" in r.json()["error"]["message"], r.text
        finally:
            rt.gate.set()
        assert _ready(c)["indexes"] == {DS: "ready"}


@pytest.mark.parametrize(("datasets", "ready"), [((DS, "broken"), True), (("broken",), False)])
def test_a_failed_dataset_is_named_and_only_no_dataset_serving_is_unready(
        tmp_path: Path, datasets: tuple[str, ...], ready: bool) -> None:
    rt = _runtime(tmp_path, datasets, broken=frozenset({"broken"}))
    with _client(rt) as c:
        deadline = time.monotonic() + 10
        while (r := c.get("/readyz", headers=AUTH)).status_code != 200 and "startup" in r.json()["error"]["message"]:
            assert time.monotonic() < deadline, r.text  # the warm-up has not finished
            time.sleep(0.05)
        if ready:
            assert r.status_code == 200, r.text
            assert r.json()["indexes"] == {DS: "ready", "broken": "failed: RuntimeError: index file is corrupt"}
        else:
            assert r.status_code == 503, r.text
            msg = r.json()["error"]["message"]
            assert "indexes broken: failed: RuntimeError: index file is corrupt" in msg and "no dataset can serve" in msg
            anon = c.get("/readyz").json()["error"]["message"]
            assert "indexes <dataset>: failed: RuntimeError: index file is corrupt" in anon and "broken" not in anon
