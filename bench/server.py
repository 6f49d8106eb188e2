"""A real `shoplens serve` (uvicorn in its own process) on a free loopback port, for the runs that
load or kill it: the fault section and the reliability run (`python -m bench.reliability`)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked; the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """Every descendant process of `pid` (from /proc), children before grandchildren."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def model_server_pids(serve_pid: int) -> list[int]:
    """The embedded model server processes started by the API process `serve_pid`."""
    found = []
    for c in children(serve_pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "llama" in cmd:
            found.append(c)
    return found


async def kill_model_server(client: httpx.AsyncClient, serve_pid: int, kill: dict[str, Any], *, t_start: float,
                            give_up_at_s: float) -> None:
    """SIGKILL the embedded model server of the API process `serve_pid` now, and record in `kill`
    at once its ``pids`` and ``at_s`` (seconds since `t_start`, a `time.perf_counter()`), so
    load loops can tell before from after; then poll ``/readyz`` each second until it answers
    200 (``ready_after_s``: seconds after the kill: the API restarted the server and it answered
    a probe) or `give_up_at_s` seconds since `t_start` pass."""
    kill["pids"] = model_server_pids(serve_pid)
    for p in kill["pids"]:
        os.kill(p, signal.SIGKILL)
    kill["at_s"] = time.perf_counter() - t_start
    await asyncio.sleep(1.0)
    while time.perf_counter() - t_start < give_up_at_s:
        with suppress(httpx.HTTPError):
            if (await client.get("/readyz", timeout=40)).status_code == 200:
                kill["ready_after_s"] = time.perf_counter() - t_start - kill["at_s"]
                return
        await asyncio.sleep(1.0)


async def read_back(client: httpx.AsyncClient, dataset: str, user: str) -> set[str]:
    """Every stored event id of `user`, paged through ``GET /v1/users/{id}/events`` (empty when
    the API does not know the user)."""
    stored: set[str] = set()
    offset = 0
    while True:
        r = await client.get(f"/v1/users/{user}/events", params={"dataset": dataset, "offset": offset, "limit": 1000})
        if r.status_code == 404:
            return stored
        r.raise_for_status()
        page = r.json()
        stored |= {e["event_id"] for e in page["events"]}
        offset += len(page["events"])
        if not page["events"] or offset >= page.get("total", offset):
            return stored


@dataclass
class Served:
    """A running API process: its base URL, process and log file."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else "(no log)"


def wait_until(url: str, path: str, *, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
               log: Path | None = None) -> float:
    """Poll GET `url + path` until it answers 200; returns the seconds it took.

    Raises:
        RuntimeError: the process exited or `timeout_s` passed first (the log tail is in the message).
    """
    t0 = time.perf_counter()
    while True:
        try:
            if httpx.get(url + path, timeout=35).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if (proc is not None and proc.poll() is not None) or time.perf_counter() - t0 > timeout_s:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else "(no log)"
            raise RuntimeError(f"server not answering {path} with 200 after {time.perf_counter() - t0:.0f} s: {tail}")
        time.sleep(0.5)


@contextmanager
def serve(workspace: Path, env: Mapping[str, str], log_path: Path, *, ready_path: str = "/readyz",
          ready_timeout_s: float = 300.0, port: int | None = None) -> Iterator[Served]:
    """Start ``python -m ui.cli serve --no-ui`` over `workspace` with `env` (SHOPLENS_* settings),
    wait until `ready_path` answers 200, yield it; SIGTERM (then SIGKILL after 30 s) at exit, and
    SIGKILL any model server left behind. A process already killed by the caller is fine.

    Raises:
        RuntimeError: not ready within `ready_timeout_s` (the log tail is in the message).
    """
    port = port or free_port()
    log = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "ui.cli", "serve", "--no-ui", "--port", str(port),
                             "--workspace", str(workspace)], env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_until(served.url, ready_path, timeout_s=ready_timeout_s, proc=proc, log=log_path)
        yield served
    finally:
        left = children(proc.pid) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
