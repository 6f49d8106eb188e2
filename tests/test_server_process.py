"""agent/llm/servers/process.py: the lifecycle both model servers share, run on a tiny real
HTTP server (a Python one-liner on a free loopback port), so no model is needed."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from agent.domain.errors import ModelUnavailableError
from agent.llm.servers.embedded import EmbeddedServer
from agent.llm.servers.process import ServerProcess, free_port
from agent.llm.servers.vllm import VllmOptions, VllmServer

# Answers GET /v1/models with 200 (after `delay` seconds of start-up), everything else 404.
_SERVER = """
import http.server, sys, time
time.sleep(float(sys.argv[2]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v1/models" else 404); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class TinyServer(ServerProcess):
    label = "tiny server"
    poll_s = 0.05

    def __init__(self, *, delay: float = 0.0, exit_code: int | None = None, log_path: Path | None = None,
                 group: bool = False):
        super().__init__(log_path=log_path)
        self.port, self.delay, self.exit_code = free_port(), delay, exit_code
        self.own_process_group = group

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        if self.exit_code is not None:
            return [sys.executable, "-c", f"print('boom: bad flag'); raise SystemExit({self.exit_code})"]
        return [sys.executable, "-c", _SERVER, str(self.port), str(self.delay)]


@pytest.mark.parametrize("group", [False, True])
def test_start_waits_until_ready_and_stop_ends_the_process(tmp_path: Path, group: bool) -> None:
    with TinyServer(delay=0.3, log_path=tmp_path / "s.log", group=group) as s:
        assert s.alive() and s.pid is not None
        assert httpx.get(s.base_url + "/models", timeout=2).status_code == 200
    assert not s.alive() and s.pid is None
    assert "listening" in (tmp_path / "s.log").read_text()
    s.stop()  # a second stop is a no-op


def test_a_server_that_exits_is_unavailable_with_its_log_tail(tmp_path: Path) -> None:
    s = TinyServer(exit_code=3, log_path=tmp_path / "s.log")
    with pytest.raises(ModelUnavailableError, match=r"tiny server exited with code 3: boom: bad flag"):
        s.start(timeout_s=20)
    assert not s.alive()


def test_a_server_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    s = TinyServer(delay=30)
    with pytest.raises(ModelUnavailableError, match=r"tiny server not ready after 1 s: \(no log\)"):
        s.start(timeout_s=1)
    assert not s.alive()


def test_wait_ready_before_spawn_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="spawn"):
        TinyServer().wait_ready(1)


def test_both_model_servers_share_the_lifecycle(tmp_path: Path) -> None:
    emb = EmbeddedServer(tmp_path / "m.gguf", model_alias="m", n_threads=3)
    vll = VllmServer(VllmOptions(model="m", served_model_name="m"), {"A": "1"})
    assert isinstance(emb, ServerProcess) and isinstance(vll, ServerProcess)
    assert emb.environment()["OMP_NUM_THREADS"] == "3" and vll.environment() == {"A": "1"}
    assert vll.own_process_group and not emb.own_process_group
    with pytest.raises(RuntimeError, match="not started"):
        _ = emb.base_url
    assert vll.base_url == "http://127.0.0.1:8000/v1"
