"""The lifecycle every model-server subprocess shares: spawn, wait until ready, stop, die with us.

`ServerProcess` is the base of `EmbeddedServer` (llama-cpp-python) and `VllmServer` (vLLM).
A subclass gives its command line, environment, pre-start check and readiness probe; the
base runs the process with its output in a log file, polls the probe until it answers or the
process exits (the error carries the log tail), and stops it with SIGTERM, then SIGKILL.
The server dies with this process even on ``kill -9`` (Linux parent-death signal).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Self

import httpx

from agent.domain.errors import ModelUnavailableError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """``preexec_fn``: SIGTERM the child when its parent dies, even by kill -9 (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ServerProcess:
    """One OpenAI-compatible server subprocess. Use as a context manager, or `start()`/`stop()`;
    `stop()` is also registered atexit.

    Subclasses set `label` (for messages) and implement `base_url` and `command`; they may
    override `check`, `environment` and `ready`.

    Args:
        log_path: where the server's stdout/stderr go (None: `default_output`).
    """

    label = "model server"
    poll_s = 0.5  # between readiness probes
    stop_grace_s = 10.0  # SIGTERM -> SIGKILL
    own_process_group = False  # True: signal the whole group (a server with worker children)
    nice = 0  # the child's scheduling niceness (0-19); see EmbeddedServer for why it may be raised
    no_log = "(no log)"  # what an error says instead of the log tail when there is no log file

    def __init__(self, *, log_path: Path | None = None):
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- what a subclass says ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible root, ``http://host:port/v1``."""
        raise NotImplementedError

    def command(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The server's environment (default: this process's)."""
        return dict(os.environ)

    def check(self) -> None:
        """Raise `ModelUnavailableError` (saying how to fix it) when the server cannot start."""

    def ready(self) -> bool:
        """One readiness probe: ``GET /v1/models`` answers 200."""
        return httpx.get(self.base_url + "/models", timeout=2).status_code == 200

    def default_output(self) -> int | IO[Any]:
        """Where the output goes without a `log_path` (default: discarded)."""
        return subprocess.DEVNULL

    # ---- the lifecycle ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 180.0) -> Self:
        """`spawn`, then `wait_ready`.

        Raises:
            ModelUnavailableError: see `spawn` and `wait_ready`.
        """
        self.spawn()
        return self.wait_ready(timeout_s)

    def spawn(self) -> None:
        """Start the process. Call it from a long-lived thread: Linux's parent-death signal
        fires when the *thread* that forked exits, so spawning from a worker thread (e.g.
        ``asyncio.to_thread``) could kill the server when that thread is reaped.

        Raises:
            ModelUnavailableError: `check` failed (e.g. the server software is not installed).
        """
        self.check()
        cmd = self.command()
        log.info("starting %s: %s", self.label, " ".join(cmd))
        out: int | IO[Any]
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child from here on
        else:
            out = self.default_output()
        nice = self.nice

        def setup_child() -> None:  # pragma: no cover - runs in the child
            die_with_parent()
            if nice:
                os.nice(nice)

        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.environment(),
                                      start_new_session=self.own_process_group, preexec_fn=setup_child)
        atexit.register(self.stop)

    def wait_ready(self, timeout_s: float = 180.0) -> Self:
        """Probe `ready` until it holds (blocking; run it in a thread from async code).

        Raises:
            ModelUnavailableError: the process exited, or was not ready within `timeout_s`
                seconds (the log tail is included); the process is stopped.
        """
        if self._proc is None:
            raise RuntimeError("spawn() the server first")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()  # a child of its group may still be alive
                raise ModelUnavailableError(f"{self.label} exited with code {code}: {self._log_tail()}")
            try:
                if self.ready():
                    log.info("%s ready at %s", self.label, self.base_url)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(self.poll_s)
        self.stop()
        raise ModelUnavailableError(f"{self.label} not ready after {timeout_s:.0f} s: {self._log_tail()}")

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        if self._proc is None:
            raise RuntimeError("server not started")
        return self._proc.wait()

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the server (its process group with `own_process_group`), SIGKILL it after
        `grace_s` seconds (default `stop_grace_s`). A no-op when it is not running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        grace = self.stop_grace_s if grace_s is None else grace_s
        if self.own_process_group:  # the group even when the leader exited: workers may linger
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
        elif proc.poll() is not None:
            return
        else:
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            if self.own_process_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(timeout=10)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        """The exit code once the spawned server has exited on its own (negative: killed by that
        signal); the process is reaped, so no zombie is left. None while it runs, and when it was
        never spawned or was stopped on purpose."""
        return self._proc.poll() if self._proc is not None else None

    def _log_tail(self, n: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return self.no_log

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
