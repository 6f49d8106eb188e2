"""Precompute on Ray (agent/app/precompute_ray.py, ``shoplens precompute --ray-address``).

A real local Ray (`ray_session("local")`: 2 CPUs, no dashboard, 127.0.0.1) runs the actors; two
fake OpenAI-compatible model servers (tests/test_api.py's `FakeLLM`, each on its own loopback
port) stand for two vLLM replicas. The workspace is the online-retail fixture with the hashing
embedder, as in tests/test_precompute.py's HTTP tests. The CLI tests below start no Ray.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.app.precompute import precompute
from agent.app.precompute_ray import precompute_on_ray, ray_session, replica_urls
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import RequestError
from agent.settings import Settings
from tests.test_api import DATASET, FakeLLM, agent_settings
from ui.api.testing import live_server
from ui.cli import app

CALLS_PER_USER = 1  # the explanation: the model does not rank a dataset without a fitted weight


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("ws-ray")
    Runtime(agent_settings(ws)).ingest(DATASET, show_progress=False)
    return ws


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[tuple[FakeLLM, str]]]:
    """Two fake model servers: (fake, base URL) each."""
    a, b = FakeLLM(), FakeLLM()
    with live_server(a.app) as url_a, live_server(b.app) as url_b:
        yield [(a, url_a + "/v1"), (b, url_b + "/v1")]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    with ray_session("local"):
        yield


def stored_rankings(rt: Runtime, users: list[str], k: int) -> dict[str, list[tuple[str, float, str, str]]]:
    out = {}
    for u in users:
        e = rt.answers.get(DATASET, u, k)
        assert e is not None, u
        out[u] = [(i.item_id, round(i.score, 9), i.reason, i.reason_source) for i in e.prediction.items]
    return out


def test_ray_fans_out_over_two_replicas_stores_what_the_local_path_stores_and_resumes(
        workspace: Path, replicas: list[tuple[FakeLLM, str]], local_ray: None) -> None:
    (fake_a, url_a), (fake_b, url_b) = replicas
    rt = Runtime(agent_settings(workspace, url_a))
    users = sorted(rt.store.user_ids(DATASET))[:8]
    svc = ShopLensService(rt)

    report = precompute_on_ray(svc, DATASET, [*users, "no-such-user"], 3, base_urls=[url_a, url_b], progress=False)
    assert (report.users, report.done, report.failed, report.skipped_fresh, report.degraded) == (9, 8, 1, 0, 0)
    assert report.errors[0].user_id == "no-such-user" and "UnknownUserError" in report.errors[0].error
    # dealt round-robin: users 0, 2, 4, 6 (and the unknown one, who costs no call) to A; 1, 3, 5, 7 to B
    assert report.replicas == {url_a: 4, url_b: 4}
    assert len(fake_a.prompts) == len(fake_b.prompts) == 4 * CALLS_PER_USER
    assert report.model_calls == 8 * CALLS_PER_USER and report.prompt_tokens == 8 * CALLS_PER_USER * 100
    assert report.users_per_hour is not None and report.users_per_hour > 0
    version = svc.next_item_version(DATASET, k=3, use_model=True)
    for u in users:
        e = rt.answers.get(DATASET, u, 3)
        assert e is not None and not e.stale and e.pipeline_version == version
        assert e.events_sha256 == rt.store.user_events_sha256(DATASET, u)
        assert len(e.prediction.items) == 3 and {i.reason_source for i in e.prediction.items} == {"model"}
    on_ray = stored_rankings(rt, users, 3)

    # a rerun (a fresh driver) skips everyone: nothing reaches Ray or the replicas
    rt2 = Runtime(agent_settings(workspace, url_b))
    again = precompute_on_ray(ShopLensService(rt2), DATASET, users, 3, base_urls=[url_a, url_b], progress=False)
    assert (again.done, again.skipped_fresh, again.failed, again.replicas) == (0, 8, 0, {})
    assert len(fake_a.prompts) == len(fake_b.prompts) == 4 * CALLS_PER_USER

    # the local path judges the actors' answers fresh too (same events hash, same pipeline version)...
    local_svc = ShopLensService(Runtime(agent_settings(workspace, url_a)))
    local = asyncio.run(precompute(local_svc, DATASET, users, 3, progress=False))
    assert (local.done, local.skipped_fresh) == (0, 8)
    # ...and, recomputing them, stores the same rankings, scores and reasons
    local = asyncio.run(precompute(local_svc, DATASET, users, 3, progress=False, resume=False))
    assert (local.done, local.skipped_fresh, local.replicas) == (8, 0, {})
    assert stored_rankings(local_svc.runtime, users, 3) == on_ray
    asyncio.run(local_svc.runtime.aclose())
    for r in (rt, rt2):
        asyncio.run(r.aclose())


def test_cli_on_ray_without_the_model_one_pool_of_two_actors(workspace: Path, local_ray: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPLENS_EMBEDDER", "hashing-64")  # as the workspace was indexed
    monkeypatch.delenv("SHOPLENS_LLM_BASE_URL", raising=False)
    args = ["--dataset", DATASET, "--workspace", str(workspace), "--ray-address", "local", "--no-llm", "--limit", "6",
            "-k", "4", "--actors-per-replica", "2", "--concurrency", "2", "--json"]
    r = CliRunner().invoke(app, ["precompute", *args], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert (report["done"], report["failed"], report["model_calls"]) == (6, 0, 0)
    assert report["replicas"] == {"(no model)": 6} and "computed via (no model)" in r.output
    rt = Runtime(Settings(workspace=workspace, embedder="hashing-64"))
    users = rt.store.user_ids(DATASET)
    stored = [u for u in users if rt.answers.get(DATASET, u, 4) is not None]
    assert len(stored) == 6
    assert all(e is not None and {i.reason_source for i in e.prediction.items} == {"fallback"}
               for e in (rt.answers.get(DATASET, u, 4) for u in stored))
    r = CliRunner().invoke(app, ["precompute", *args], env={"COLUMNS": "200"})
    again = json.loads(r.stdout[r.stdout.index("{"):])
    assert r.exit_code == 0 and (again["done"], again["skipped_fresh"]) == (0, 6)
    asyncio.run(rt.aclose())


# ---- flags, checked before anything starts ---------------------------------------------------------


def test_replicas_come_from_base_urls_or_the_configured_server(tmp_path: Path) -> None:
    configured = Settings(workspace=tmp_path, llm_base_url="http://10.0.0.9:8000/v1")
    assert replica_urls(["http://a:8000/v1", "http://b:8000/v1"], configured, use_model=True) == [
        "http://a:8000/v1", "http://b:8000/v1"]
    assert replica_urls([], configured, use_model=True) == ["http://10.0.0.9:8000/v1"]
    bare = Settings(workspace=tmp_path)
    assert replica_urls([], bare, use_model=False) == [None]  # no model: one pool, no server
    with pytest.raises(RequestError, match="--base-url URL once per replica") as e:
        replica_urls([], bare, use_model=True)
    assert e.value.param == "base_url"
    with pytest.raises(RequestError, match="was given twice"):
        replica_urls(["http://a:8000/v1", "http://a:8000/v1"], bare, use_model=True)
    with pytest.raises(RequestError, match="http\\(s\\)://"):
        replica_urls(["a:8000/v1"], bare, use_model=True)


def shoplens(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["precompute", *args], env={"COLUMNS": "200"})
    return r.exit_code, " ".join(r.output.split())  # rich wraps long lines


def test_cli_several_base_urls_need_ray(tmp_path: Path) -> None:
    code, out = shoplens("--dataset", DATASET, "--workspace", str(tmp_path), "--base-url", "http://127.0.0.1:1/v1",
                         "--base-url", "http://127.0.0.1:2/v1")
    assert code == 2 and "--base-url was given 2 times: several replicas need --ray-address" in out
    code, out = shoplens("--dataset", DATASET, "--workspace", str(tmp_path), "--actors-per-replica", "2")
    assert code == 2 and "--actors-per-replica needs --ray-address" in out


def test_cli_names_the_extra_when_ray_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code, out = shoplens("--dataset", DATASET, "--workspace", str(tmp_path), "--ray-address", "local", "--no-llm")
    assert code == 2 and "needs Ray, ShopLens's optional 'batch' extra: pip install -e '.[batch]'" in out


def test_cli_refuses_a_bad_ray_address_and_a_model_run_without_a_server(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOPLENS_LLM_BASE_URL", raising=False)
    code, out = shoplens("--dataset", DATASET, "--workspace", str(tmp_path), "--ray-address", "http://head:8265")
    assert code == 2 and "--ray-address must be 'local', 'auto', 'ray://HOST:10001'" in out
    code, out = shoplens("--dataset", DATASET, "--workspace", str(tmp_path), "--ray-address", "local")
    assert code == 2 and "needs the model servers' base URLs: --base-url URL once per replica" in out
