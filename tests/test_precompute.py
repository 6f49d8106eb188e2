"""Precomputed next-item answers (agent/app/answers.py, agent/app/precompute.py): a killed run
resumes where it stopped, a user with new events is marked stale and refreshed by the worker, a
pipeline change makes stored answers stale, stored answers are served with when they were
computed, and the batch endpoint answers the users it can and names the one it cannot.

In process: the tiny shop of tests/test_chat.py with a fake model that logs the lane of every
call. Over HTTP: the real app under uvicorn with tests/test_api.py's fake OpenAI-compatible model
server, the refresh worker polling every 50 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agent.app.answers import AnswerStore, pipeline_version
from agent.app.precompute import PrecomputeReport, RefreshWorker, precompute
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.data.store import EventStore
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import Completion, Message, ModelUnavailableError
from agent.llm.wrappers import current_lane
from agent.settings import Settings
from agent.tasks.next_item import NextItemConfig
from tests.test_api import AUTH, DATASET, USER, agent_settings, fake_llm, serve_app  # noqa: F401 - a fixture
from tests.test_chat import CATALOG, DS, EVENTS, FakeRuntime, make_runtime
from tests.test_progressive import GatedModel
from ui.cli import app as cli_app

SHOP_USERS = ["17850", "17851", "12347", "13047", "14000"]
CALLS_PER_USER = 1  # the explanation: the model does not rank a dataset without a fitted weight


class BatchModel(GatedModel):
    """The gated fake with its gates open: logs the model lane of every call; with `hang_at`, the
    call with that number (1-based) never returns (a process killed mid-answer)."""

    def __init__(self, hang_at: int | None = None, fail: Exception | None = None) -> None:
        super().__init__(fail=fail)
        self.rank_gate.set(), self.explain_gate.set()
        self.lanes: list[str] = []
        self.hang_at = hang_at
        self.hanging = asyncio.Event()

    async def complete(self, messages: list[Message], **kw: Any) -> Completion:
        self.lanes.append(current_lane())
        if len(self.lanes) == self.hang_at:
            self.hanging.set()
            await asyncio.Event().wait()
        return await super().complete(messages, **kw)


def shop(tmp_path: Path, model: BatchModel, **settings: Any) -> ShopLensService:
    """The tiny shop plus a fifth customer; `settings` change the served configuration."""
    if not settings:
        rt = make_runtime(tmp_path, model)
        rt.store.add_events(DS, [BehaviorEvent(user_id="14000", item_id=i, event_type="purchase",
                                               timestamp=datetime(2011, 10, d + 1, tzinfo=UTC))
                                 for d, i in enumerate(["22386", "21212", "84879"])])
        return ShopLensService(rt)
    return ShopLensService(FakeRuntime(Settings(workspace=tmp_path, embedder="hashing-64", **settings), model))


# ---- resume ---------------------------------------------------------------------------------------


async def test_precompute_resumes_after_being_killed(tmp_path: Path) -> None:
    model = BatchModel(hang_at=2 * CALLS_PER_USER + 1)  # the third user's first call never returns
    svc = shop(tmp_path, model)
    run = asyncio.create_task(precompute(svc, DS, SHOP_USERS, 3, progress=False))
    await asyncio.wait_for(model.hanging.wait(), 20)
    run.cancel()  # the kill
    with pytest.raises(asyncio.CancelledError):
        await run
    answers = svc.runtime.answers
    assert answers.count(DS) == 2  # committed one by one: the two finished users survived
    kept = {u: answers.get(DS, u, 3) for u in SHOP_USERS[:2]}
    assert all(e is not None and not e.stale for e in kept.values())

    # the rerun: another process (a fresh runtime over the same workspace) with a counting model
    model2 = BatchModel()
    svc2 = ShopLensService(FakeRuntime(Settings(workspace=tmp_path, embedder="hashing-64"), model2))
    report = await precompute(svc2, DS, SHOP_USERS, 3, progress=False)
    assert (report.done, report.skipped_fresh, report.failed, report.degraded) == (3, 2, 0, 0)
    assert len(model2.lanes) == 3 * CALLS_PER_USER == report.model_calls  # only the three left
    assert set(model2.lanes) == {"batch"}  # behind every interactive and background call
    assert (report.prompt_tokens, report.completion_tokens) == (3 * 80, 3 * 20)  # the explanation's
    assert report.users_per_hour is not None and report.users_per_hour > 0
    for u, e in kept.items():  # the survivors were not recomputed
        again = svc2.runtime.answers.get(DS, u, 3)
        assert again is not None and e is not None and again.computed_at == e.computed_at
    stored = [svc2.runtime.answers.get(DS, u, 3) for u in SHOP_USERS]
    assert all(e is not None and all(i.reason_source == "model" for i in e.prediction.items) for e in stored)

    # a third run has nothing left to do; --no-resume recomputes everyone
    assert (await precompute(svc2, DS, SHOP_USERS, 3, progress=False)).skipped_fresh == 5
    assert (await precompute(svc2, DS, SHOP_USERS[:1], 3, progress=False, resume=False)).done == 1
    assert len(model2.lanes) == 4 * CALLS_PER_USER


async def test_unknown_users_are_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    svc = shop(tmp_path, BatchModel())
    report = await precompute(svc, DS, ["17850", "nobody", "12347"], 3, use_model=False, progress=False,
                              concurrency=2)
    assert (report.done, report.failed) == (2, 1)
    assert report.errors[0].user_id == "nobody" and "UnknownUserError" in report.errors[0].error
    assert report.model_calls == 0 and svc.runtime.answers.count(DS) == 2


# ---- the CLI: exit status -------------------------------------------------------------------------


def test_the_cli_exits_1_when_any_user_failed_and_names_the_file_listing_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It exited 0 unless every user failed, so a run that lost users looked like a success."""
    shop(tmp_path, BatchModel())
    monkeypatch.setenv("SHOPLENS_EMBEDDER", "hashing-64")

    def run(users: str, *more: str) -> Any:
        return CliRunner().invoke(cli_app, ["precompute", "--dataset", DS, "--workspace", str(tmp_path), "--no-llm",
                                            "-k", "3", "--users", users, *more], env={"COLUMNS": "200"})

    failed = tmp_path / "precompute" / f"{DS}.k3.failed.jsonl"
    r = run("17850,nobody,12347", "--json")
    assert r.exit_code == 1, r.output
    assert r.stderr.splitlines()[-1] == (f"error: 1 of 3 users failed (no answer stored for them); every failure "
                                         f"is listed in {failed}")
    report = json.loads(r.stdout)
    assert (report["done"], report["failed"], report["failures_file"]) == (2, 1, str(failed))
    rows = [json.loads(line) for line in failed.read_text().splitlines()]
    assert [x["user_id"] for x in rows] == ["nobody"] and rows[0]["error"].startswith("UnknownUserError: ")
    r = run("17850,nobody,12347")  # the rerun: two answers fresh, the unknown user fails again
    assert r.exit_code == 1 and "1 of 3 users failed" in r.stderr
    assert len(failed.read_text().splitlines()) == 1  # this run's failures, not appended to the last run's
    r = run("17850,12347")
    assert r.exit_code == 0, r.output
    assert not failed.exists()  # no failure left: the old list would name users that now have answers
    assert "users failed" not in r.stderr


_STOPPED_CHILD = """
import sys
from pathlib import Path

import ui.precompute_cli as cli
from tests.test_chat import DS, FakeRuntime
from tests.test_precompute import CALLS_PER_USER, SHOP_USERS, BatchModel
from ui.cli import app

ws = Path(sys.argv[1])


class Hanging(BatchModel):
    async def complete(self, messages, **kw):
        if len(self.lanes) + 1 == self.hang_at:  # the call that never returns: say so, then hang
            (ws / "hanging").touch()
        return await super().complete(messages, **kw)


cli.Runtime = lambda settings: FakeRuntime(settings, Hanging(hang_at=2 * CALLS_PER_USER + 1))
app(["precompute", "--dataset", DS, "--workspace", str(ws), "-k", "3", "--users", ",".join(SHOP_USERS)])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_cli_with_one_line_no_traceback_and_a_rerun_resumes(tmp_path: Path,
                                                                               signum: signal.Signals) -> None:
    """SIGTERM raised SystemExit wherever the interpreter was: no word said, and a traceback when
    it landed inside a task. Now both signals cancel the run: 128 + the signal, one line."""
    shop(tmp_path, BatchModel())
    (tmp_path / "child.py").write_text(_STOPPED_CHILD)
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "SHOPLENS_EMBEDDER": "hashing-64", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(tmp_path)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "hanging").exists():  # two users stored, the third one's model call hangs
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    stopped = [line for line in stderr.splitlines() if "stopped" in line]
    assert stopped == [f"stopped by {signum.name}: the answers made so far are stored; run the same command "
                       "again to resume"], stderr
    model = BatchModel()
    svc = ShopLensService(FakeRuntime(Settings(workspace=tmp_path, embedder="hashing-64"), model))
    assert svc.runtime.answers.count(DS) == 2  # what was stored before the signal
    report = asyncio.run(precompute(svc, DS, SHOP_USERS, 3, progress=False))
    assert (report.done, report.skipped_fresh, report.failed) == (3, 2, 0)


# ---- staleness and the refresh worker -----------------------------------------------------------


async def test_a_stale_user_is_refreshed_after_new_events(tmp_path: Path) -> None:
    model = BatchModel()
    svc = shop(tmp_path, model)
    await precompute(svc, DS, ["17850", "12347"], 3, progress=False)
    before = await svc.stored_next_item(DS, "17850", 3)
    assert before is not None and before.stale is False and before.stale_reason is None
    assert before.refinement.stage == "explained" and before.refinement.state == "done"
    assert before.user_id == "17850" and any(n.startswith("precomputed at ") and n.endswith("; fresh")
                                             for n in before.meta.notes)
    top = before.items[0].item_id

    out = await svc.ingest_events(DS, [{"user_id": "17850", "item_id": top, "event_type": "purchase",
                                        "timestamp": "2011-10-20T00:00:00Z", "quantity": 1}])
    assert out.stored == 1
    flagged = svc.runtime.answers.get(DS, "17850", 3)
    assert flagged is not None and flagged.stale is True  # POST /v1/events' hook, before anything is served
    assert svc.runtime.answers.queued(DS) == 1
    stale = await svc.stored_next_item(DS, "17850", 3)
    assert stale is not None and stale.stale is True
    assert stale.stale_reason == "the user's events changed since it was computed"
    assert stale.computed_at == before.computed_at and [i.item_id for i in stale.items] == [i.item_id for i in before.items]
    fresh_other = await svc.stored_next_item(DS, "12347", 3)
    assert fresh_other is not None and fresh_other.stale is False  # only the user with new events
    assert svc.runtime.answers.queued(DS) == 1

    calls = len(model.lanes)
    worker = RefreshWorker(svc, poll_s=0.01)
    assert await worker.run_once() == 1
    assert (worker.refreshed, worker.unchanged) == (1, 0)
    assert len(model.lanes) - calls == CALLS_PER_USER and set(model.lanes[calls:]) == {"batch"}
    after = await svc.stored_next_item(DS, "17850", 3)
    assert after is not None and after.stale is False and after.computed_at > before.computed_at
    assert top not in [i.item_id for i in after.items]  # just bought: the refreshed answer leaves it out
    assert svc.runtime.answers.queued(DS) == 0 and await worker.run_once() == 0

    # a batch of events that were all stored before marks nobody
    again = await svc.ingest_events(DS, [{"user_id": "17850", "item_id": top, "event_type": "purchase",
                                          "timestamp": "2011-10-20T00:00:00Z", "quantity": 1}])
    assert again.stored == 0 and svc.runtime.answers.queued(DS) == 0


async def test_a_refresh_that_cannot_reach_the_model_is_retried_later(tmp_path: Path) -> None:
    down = BatchModel(fail=ModelUnavailableError("server down"))
    svc = shop(tmp_path, down)
    report = await precompute(svc, DS, ["17850"], 3, progress=False)
    assert (report.done, report.degraded) == (1, 1)
    served = await svc.stored_next_item(DS, "17850", 3)
    assert served is not None and served.stale is True
    assert (served.stale_reason or "").startswith("made without the model it asked for")
    answers = svc.runtime.answers
    assert answers.queued(DS) == 1  # serving a stale answer queued its refresh
    worker = RefreshWorker(svc, retry_s=60, max_attempts=2)
    assert await worker.run_once() == 1
    assert answers.queued(DS) == 1 and answers.next_due() is None  # still queued, not due for 60 s
    assert answers.next_due(now=time.time() + 61) is not None
    # with the model back, the next run of precompute redoes it (a degraded answer is never fresh)
    svc_up = ShopLensService(FakeRuntime(Settings(workspace=tmp_path, embedder="hashing-64"), BatchModel()))
    again = await precompute(svc_up, DS, ["17850"], 3, progress=False)
    assert (again.done, again.skipped_fresh, again.degraded) == (1, 0, 0)
    ok = await svc_up.stored_next_item(DS, "17850", 3)
    assert ok is not None and ok.stale is False


def test_pipeline_version_names_what_changes_an_answer() -> None:
    base = NextItemConfig(k=5)

    def v(cfg: NextItemConfig = base, **kw: Any) -> str:
        return pipeline_version(cfg, **({"model": "m1", "fusion_weights": None, "index_manifest_sha256": "a",
                                          "llm_weight": 0.5} | kw))

    assert v() == v() and len(v()) == 16
    assert v(replace(base, explain_lane="batch")) == v()  # where the call waits, not what it says
    for changed in (replace(base, k=6), replace(base, window=10), replace(base, llm_scorer="pointwise"),
                    replace(base, permutations=1), replace(base, n_candidates=30), replace(base, repurchase=True),
                    replace(base, source_weights={"covisit": 1.0}), replace(base, explain=False),
                    replace(base, explain_max_words=25), replace(base, summary_max_chars=400)):
        assert v(changed) != v(), changed
    assert v(model="m2") != v()
    assert v(fusion_weights={"covisit": 1.0}) != v() != v(fusion_weights={"covisit": 2.0})
    assert v(index_manifest_sha256="b") != v()
    assert v(llm_weight=0.3) != v() != v(replace(base, llm_weight=0.3))  # the dataset's weight, or the caller's
    # at weight 0 the model does not rank: nothing of the ranking call counts
    unranked = {"llm_weight": 0.0}
    assert v(replace(base, llm_scorer="pointwise", permutations=1), **unranked) == v(**unranked) != v()
    plain = replace(base, use_llm_ranking=False, explain=False)
    assert v(plain, model="m2") == v(plain)  # an answer without the model does not depend on it
    assert v(replace(plain, permutations=1, max_attempts=5, explain_max_words=25)) == v(plain)


async def test_a_pipeline_change_makes_stored_answers_stale(tmp_path: Path) -> None:
    model = BatchModel()
    svc = shop(tmp_path, model)
    assert (await precompute(svc, DS, SHOP_USERS, 3, progress=False)).done == 5
    calls = len(model.lanes)
    assert (await precompute(svc, DS, SHOP_USERS, 3, progress=False)).skipped_fresh == 5
    assert len(model.lanes) == calls

    # the same workspace served with another history window: same events, another pipeline
    narrow = shop(tmp_path, model, history_window=10)
    ans = await narrow.stored_next_item(DS, "17850", 3)
    assert ans is not None and ans.stale is True and "pipeline changed" in (ans.stale_reason or "")
    again = await precompute(narrow, DS, SHOP_USERS, 3, progress=False)
    assert (again.done, again.skipped_fresh) == (5, 0)

    # weights from `shoplens train` count too
    narrow.runtime.artifacts(DS).fusion_weights = {"embedding": 1.0, "covisit": 2.0, "similar_users": 0.5,
                                                   "popularity": 0.1}
    retrained = await narrow.stored_next_item(DS, "17850", 3)
    assert retrained is not None and retrained.stale is True

    # a stored answer for another k is another entry: none for k=4
    assert await narrow.stored_next_item(DS, "17850", 4) is None


async def test_an_answer_without_the_model_is_served_for_what_it_is_and_forgotten_with_its_user(
        tmp_path: Path) -> None:
    model = BatchModel()
    svc = shop(tmp_path, model)
    await precompute(svc, DS, ["17850", "12347"], 3, use_model=False, progress=False)
    assert model.lanes == []
    ans = await svc.stored_next_item(DS, "17850", 3)
    assert ans is not None and ans.stale is False
    assert ans.refinement.stage == "fast" and ans.refinement.state == "skipped"
    assert ans.refinement.error == "precomputed without the model"
    # it was logged for feedback as a precomputed answer
    event = await svc.record_feedback_event(ans.recommendation_id, ans.items[0].item_id, "click")
    assert (event.stage, event.position) == ("precomputed", 1)
    await svc.forget_user(DS, "17850")
    assert await svc.stored_next_item(DS, "17850", 3) is None
    assert svc.runtime.answers.count(DS) == 1


async def test_pseudonymised_users_are_stored_under_their_pseudonym_and_served_under_their_id(
        tmp_path: Path) -> None:
    rt = FakeRuntime(Settings(workspace=tmp_path, embedder="hashing-64", pseudonymise_key="operator-secret"),
                     BatchModel())
    rt.store.add_items(DS, [CatalogItem(item_id=i, title=t) for i, t in CATALOG.items()])
    svc = ShopLensService(rt)
    day = 1_317_427_200  # 2011-10-01
    await svc.ingest_events(DS, [{"user_id": u, "item_id": i, "event_type": "purchase", "timestamp": day + n * 86_400}
                                 for u, items in EVENTS.items() for n, i in enumerate(items)])
    await precompute(svc, DS, ["17850"], 3, use_model=False, progress=False)
    pid = svc.stored_id("17850")
    assert pid.startswith("p_") and rt.answers.get(DS, pid, 3) is not None and rt.answers.get(DS, "17850", 3) is None
    ans = await svc.stored_next_item(DS, "17850", 3)
    assert ans is not None and ans.user_id == "17850" and ans.stale is False
    await svc.ingest_events(DS, [{"user_id": "17850", "item_id": "21212", "event_type": "view",
                                  "timestamp": day + 30 * 86_400}])
    flagged = rt.answers.get(DS, pid, 3)
    assert flagged is not None and flagged.stale is True and rt.answers.queued(DS) == 1


# ---- over HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("ws-precompute")
    Runtime(agent_settings(ws)).ingest(DATASET, show_progress=False)
    return ws


@pytest.fixture(scope="module")
def api(workspace: Path, fake_llm: tuple[Any, str]) -> Iterator[httpx.Client]:  # noqa: F811 - the fixture
    with serve_app(workspace, fake_llm[1], refresh_poll_s=0.05, max_batch_users=3) as url, \
            httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code != 200:  # the model is connected: refreshes will reach it
            assert time.monotonic() < deadline, "the app did not get ready"
            time.sleep(0.05)
        yield c


def precompute_in_another_process(workspace: Path, llm_url: str, users: list[str], k: int) -> PrecomputeReport:
    """What `shoplens precompute` does: its own runtime over the same workspace."""
    rt = Runtime(agent_settings(workspace, llm_url))

    async def go() -> PrecomputeReport:
        try:
            return await precompute(ShopLensService(rt), DATASET, users, k, progress=False)
        finally:
            await rt.aclose()

    return asyncio.run(go())


def test_stored_answer_is_served_then_refreshed_after_post_events(api: httpx.Client, workspace: Path,
                                                                  fake_llm: tuple[Any, str]) -> None:  # noqa: F811
    fake, url = fake_llm
    report = precompute_in_another_process(workspace, url, [USER], 3)
    assert (report.done, report.model_calls) == (1, 1)  # the explanation (the model does not rank: no fitted weight)
    entry = AnswerStore(workspace / "answers.sqlite3").get(DATASET, USER, 3)
    assert entry is not None

    n_prompts = len(fake.prompts)
    r = api.post("/v1/next-item", json={"dataset": DATASET, "user_id": USER, "k": 3, "stored": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["computed_at"] == round(entry.computed_at, 3) and body["stale"] is False
    assert [i["item_id"] for i in body["items"]] == [i.item_id for i in entry.prediction.items]
    assert body["refinement"]["stage"] == "explained" and len(fake.prompts) == n_prompts  # no model call
    fb = api.post("/v1/feedback", json={"recommendation_id": body["recommendation_id"],
                                        "item_id": body["items"][1]["item_id"], "kind": "click"})
    assert fb.status_code == 200 and (fb.json()["stage"], fb.json()["position"]) == ("precomputed", 2)
    plain = api.post("/v1/next-item", json={"dataset": DATASET, "user_id": USER, "k": 3, "use_llm": False})
    assert "computed_at" not in plain.json()  # without `stored`: computed now

    top = body["items"][0]["item_id"]
    ev = api.post("/v1/events", json={"dataset": DATASET, "events": [
        {"user_id": USER, "item_id": top, "event_type": "purchase", "timestamp": "2011-12-20T10:00:00Z",
         "quantity": 1}]})
    assert ev.status_code == 200 and ev.json()["stored"] == 1
    deadline = time.monotonic() + 30
    while True:  # the worker polls every 50 ms; one refresh is two fake-model calls
        now = api.post("/v1/next-item", json={"dataset": DATASET, "user_id": USER, "k": 3, "stored": True}).json()
        if now["computed_at"] > body["computed_at"] and not now["stale"]:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert top not in [i["item_id"] for i in now["items"]]  # just bought: the refreshed answer leaves it out
    assert all(i["reason_source"] == "model" for i in now["items"])


def test_batch_answers_every_user_it_can_and_names_the_one_it_cannot(api: httpx.Client, workspace: Path,
                                                                     fake_llm: tuple[Any, str]) -> None:  # noqa: F811
    store = EventStore(workspace / "shoplens.sqlite3")
    other = next(u for u in store.user_ids(DATASET) if u != USER)
    precompute_in_another_process(workspace, fake_llm[1], [USER], 4)
    r = api.post("/v1/next-item/batch", json={"dataset": DATASET, "user_ids": [USER, "no-such-user", other],
                                              "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [a["user_id"] for a in body["answers"]] == [USER, other]  # request order
    stored, computed = body["answers"]
    assert stored["stale"] is False and stored["computed_at"] > 0 and len(stored["items"]) == 4
    assert "computed_at" not in computed and computed["refinement"]["state"] == "skipped"  # use_llm=false
    assert all(i["reason_source"] == "fallback" for i in computed["items"]) and len(computed["items"]) == 4
    assert body["errors"] == [{"user_id": "no-such-user", "code": "unknown_user",
                               "message": f"no user 'no-such-user' in '{DATASET}'"}]

    r = api.post("/v1/next-item/batch", json={"dataset": "no-such-shop", "user_ids": [USER]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_dataset"  # the whole batch
    r = api.post("/v1/next-item/batch", json={"dataset": DATASET, "user_ids": [USER] * 4})  # the limit is 3 here
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_users"
    assert r.json()["error"]["param"] == "user_ids"


def test_the_default_source_weights_go_into_the_pipeline_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.app import answers

    cfg = NextItemConfig(k=3, use_llm_ranking=False, explain=False)
    before = pipeline_version(cfg, model=None, fusion_weights=None, index_manifest_sha256="m")
    # a source added to (or a weight changed in) the hand-set defaults makes stored answers stale
    monkeypatch.setattr(answers, "DEFAULT_WEIGHTS", {**answers.DEFAULT_WEIGHTS, "recent": 0.0})
    assert pipeline_version(cfg, model=None, fusion_weights=None, index_manifest_sha256="m") != before
    # fitted weights are keyed by value, whatever the defaults are
    fitted = {"covisit": 1.0}
    assert (pipeline_version(cfg, model=None, fusion_weights=fitted, index_manifest_sha256="m")
            != pipeline_version(cfg, model=None, fusion_weights=None, index_manifest_sha256="m"))
