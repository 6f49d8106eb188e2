"""The model server is supervised (issue 17, "a dead model server stays dead"): when it dies (kill
-9), the API's model holder reaps it, starts it again on the same port with a doubling wait
between failed tries, says so in /readyz-style probes and the fast path's "model down" reason,
and counts the restart.

Unit: a tiny real OpenAI-compatible server process (a Python http.server script) behind the real
`ServerProcess` lifecycle, the real `Runtime`, `ModelHolder` and guard. Real model: the packaged
embedded server, killed and recovered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from agent.app.model_holder import ModelHolder
from agent.app.runtime import Runtime
from agent.llm.base import ChatModel
from agent.llm.openai_compat import OpenAICompatModel
from agent.llm.servers.process import ServerProcess, free_port
from agent.settings import Settings

TINY = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, fail_marker = int(sys.argv[1]), sys.argv[2]
if os.path.exists(fail_marker):  # a start that fails once (the marker is used up)
    os.remove(fail_marker)
    sys.exit(3)
time.sleep(0.5)  # a start that takes a moment, like loading weights
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "tiny", "object": "model"}]})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._send({"id": "c", "object": "chat.completion", "created": 0, "model": "tiny",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "OK"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


class TinyServer(ServerProcess):
    label = "tiny model server"
    poll_s = 0.1

    def __init__(self, script: Path, fail_marker: Path):
        super().__init__()
        self.script, self.fail_marker, self.port = script, fail_marker, free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.port), str(self.fail_marker)]


class TinyRuntime(Runtime):
    """The real runtime whose "embedded" server is the tiny one."""

    def __init__(self, settings: Settings, server: TinyServer):
        super().__init__(settings)
        self.tiny = server

    async def connect_model(self) -> ChatModel:
        self._server = self.tiny
        self._server.spawn()
        await asyncio.to_thread(self._server.wait_ready, 30)
        return OpenAICompatModel(self.tiny.base_url, "tiny", "openai", timeout_s=5)


async def _until(cond, timeout_s: float = 20.0) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def _ready_holder(tmp_path: Path) -> tuple[TinyRuntime, ModelHolder, TinyServer]:
    (tmp_path / "tiny.py").write_text(TINY)
    server = TinyServer(tmp_path / "tiny.py", tmp_path / "fail-next")
    rt = TinyRuntime(Settings(workspace=tmp_path, model_cooldown_s=0.2, model_retries=0), server)
    holder = rt.background_model(retry_after_s=1, probe_cache_s=0)
    holder.start()
    await _until(lambda: holder.state == "ready")
    ok, why = await holder.probe()
    assert ok and why.startswith("model tiny answered in "), why
    return rt, holder, server


async def test_a_killed_model_server_is_restarted_on_its_port_and_answers_again(tmp_path: Path) -> None:
    rt, holder, server = await _ready_holder(tmp_path)
    try:
        pid, port = server.pid, server.port
        assert pid is not None and holder.restarts == 0
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: holder.restarting is not None)
        why = "the embedded model server exited with code -9; restart 1 under way"
        assert holder.restarting == why and holder.restarts == 1
        assert await holder.probe() == (False, why)
        assert rt.model_down() == why  # the fast path starts no refinement meanwhile
        await _until(lambda: holder.restarting is None)
        ok, _ = await holder.probe()
        assert ok and server.port == port and server.pid not in (None, pid)
        assert rt.model_down() is None or rt.model_down().startswith("model failing")  # cool-down only
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: no zombie left behind
    finally:
        await holder.aclose()
        await rt.aclose()


async def test_a_failed_restart_is_retried_after_a_wait(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rt, holder, server = await _ready_holder(tmp_path)
    try:
        (tmp_path / "fail-next").write_text("x")  # the next start exits with code 3
        os.kill(server.pid or 0, signal.SIGKILL)
        await _until(lambda: holder.restarts == 1 and holder.restarting is None, timeout_s=30)
        assert (await holder.probe())[0]
        assert not (tmp_path / "fail-next").exists()  # the failing start really ran
        assert any("model server restart failed (next try in 1 s)" in r.getMessage() for r in caplog.records)
        assert holder.restarts == 1  # one death, two starts
    finally:
        await holder.aclose()
        await rt.aclose()


async def test_a_server_stopped_on_purpose_is_not_restarted(tmp_path: Path) -> None:
    rt, holder, server = await _ready_holder(tmp_path)
    server.stop()
    await asyncio.sleep(1.5)  # more than the watch interval
    assert holder.restarts == 0 and holder.restarting is None and not server.alive()
    await holder.aclose()
    await rt.aclose()


@pytest.mark.real_model
@pytest.mark.slow
async def test_the_embedded_model_comes_back_after_kill_9(tmp_path: Path) -> None:
    """The packaged model behind the real llama-cpp-python server: kill -9, and a real
    completion answers again without restarting this process (issue 17: within 60 s)."""
    rt = Runtime(Settings(workspace=tmp_path, model_cooldown_s=1.0))
    holder = rt.background_model(probe_cache_s=0)
    holder.start()
    try:
        await _until(lambda: holder.state in ("ready", "failed"), timeout_s=300)
        assert holder.state == "ready", holder.error
        assert (await holder.probe())[0]
        pid = rt._server.pid if rt._server else None
        assert pid is not None
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: holder.restarts == 1 and holder.restarting is None, timeout_s=120)
        ok, why = await holder.probe()
        assert ok, why
        assert time.monotonic() - t0 < 60
    finally:
        await holder.aclose()
        await rt.aclose()


async def test_an_unreachable_model_server_is_not_reported_as_loading_forever(tmp_path: Path) -> None:
    """A remote URL nothing answers on: each try fails, and a retry that is loading again says
    which try it is and why the last one failed (it used to read "still loading" forever)."""
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    rt = Runtime(Settings(workspace=tmp_path, llm_base_url=url, llm_dialect="auto", model_cooldown_s=0))
    holder = ModelHolder(rt, retry_after_s=1)
    holder.start()
    assert holder.unavailable() == "the model is still loading"  # the first try: nothing known yet
    async with asyncio.timeout(10):
        while holder.state == "loading":
            await asyncio.sleep(0.01)
    assert holder.state == "failed" and f"model server at {url} did not answer" in (holder.error or "")
    with pytest.raises(Exception, match=r"still loading \(try 2; the last one failed: ModelUnavailableError: "
                                        r"model server at http://127\.0\.0\.1:\d+/v1 did not answer"):
        await holder.get()  # the cool-down (0 s) has passed: a second try starts
    await rt.aclose()


async def test_a_busy_model_is_ready_while_it_answers_and_the_probe_never_queues(tmp_path: Path) -> None:
    """Under load every slot is taken: /readyz must not queue a probe behind real calls (it
    timed out there and turned 503, which makes an orchestrator pull a working instance)."""
    rt, holder, server = await _ready_holder(tmp_path)
    try:
        guard = await holder.get()
        for _ in range(guard.slots.capacity):  # every slot held by a long call
            await guard.slots.acquire(0)
        real = guard.inner.complete

        async def refused(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError("the probe queued a completion behind a busy model")

        guard.inner.complete = refused
        ok, why = await holder.probe()
        assert ok and "busy (2 calls running, 0 waiting); its last answer" in why, why
        guard.last_ok -= guard.config.timeout_s + 1  # no answer for longer than a call's deadline
        ok, why = await holder.probe()
        assert not ok and why.endswith(f"none within {guard.config.timeout_s:g} s"), why
        for _ in range(guard.slots.capacity):
            guard.slots.release()
        guard.inner.complete = real
        ok, why = await holder.probe()  # idle again: a real 1-token completion
        assert ok and why.startswith("model tiny answered in "), why
    finally:
        await holder.aclose()
        server.stop()
