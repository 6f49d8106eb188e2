"""A REAL vLLM server for the contract tests: one per session, on a free 127.0.0.1 port.

It is started exactly as `shoplens serve-llm --engine vllm` starts it (`vllm_command`,
`vllm_env`), on the packaged Qwen2.5-Coder-0.5B converted by `make setup-vllm`, health-checked,
and stopped at the end. Its log stays in test-artifacts/vllm-server.log and the measured
startup and per-call latencies in test-artifacts/vllm-contract-timings.json.

These tests only run when selected with ``-m vllm`` (`make test-vllm`); every other run
deselects them, so `make test` is unchanged. Without .venv-vllm or the converted model they
skip with the reason, or fail when SHOPLENS_REQUIRE_VLLM=1 (set by `make test-vllm`, so CI
cannot pass by skipping).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.llm.base import ChatModel, Completion, Message
from agent.llm.servers.embedded import free_port
from agent.llm.servers.vllm import (
    DEFAULT_CPU_MODEL,
    DEFAULT_VENV,
    VllmOptions,
    VllmServer,
    is_cpu_build,
    vllm_env,
)
from agent.settings import PROJECT_ROOT

ARTIFACTS = PROJECT_ROOT / "test-artifacts"
SERVED_NAME = "qwen2.5-coder-0.5b-instruct"
STARTUP_TIMEOUT_S = 600  # measured 70-90 s alone; a loaded 2-core machine can be several times slower


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect `vllm` tests unless the -m expression asks for them."""
    expr = (config.getoption("markexpr") or "").replace("not vllm", "")
    if "vllm" in expr:
        return
    drop = [it for it in items if it.get_closest_marker("vllm")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if not it.get_closest_marker("vllm")]


def _absent(reason: str) -> None:
    if os.environ.get("SHOPLENS_REQUIRE_VLLM") == "1":
        pytest.fail(f"{reason} (SHOPLENS_REQUIRE_VLLM=1: run `make setup-vllm`)", pytrace=False)
    pytest.skip(f"{reason}: run `make setup-vllm`")


@dataclass
class Timings:
    """Measured seconds, written to test-artifacts/vllm-contract-timings.json."""

    startup_s: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)

    def write(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        lat = sorted(c["latency_s"] for c in self.calls)
        summary = {"startup_s": round(self.startup_s, 1), "n_calls": len(lat)}
        if lat:
            summary |= {"p50_s": round(lat[len(lat) // 2], 3), "max_s": round(lat[-1], 3)}
        (ARTIFACTS / "vllm-contract-timings.json").write_text(
            json.dumps({"summary": summary, "calls": self.calls}, indent=2) + "\n")


@dataclass
class Served:
    base_url: str
    model: str
    timings: Timings


@pytest.fixture(scope="session")
def vllm_served() -> Iterator[Served]:
    python = DEFAULT_VENV / "bin" / "python"
    if not python.exists():
        _absent(f"{python} is missing")
    if not (DEFAULT_CPU_MODEL / "shoplens-manifest.json").exists():
        _absent(f"the converted model {DEFAULT_CPU_MODEL} is missing")
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / "vllm-server.log"
    log_path.write_text("")
    opts = VllmOptions(model=str(DEFAULT_CPU_MODEL), served_model_name=SERVED_NAME, port=free_port(),
                       python=str(python))
    device = "cpu" if is_cpu_build(str(python)) else "cuda"
    # 1 GiB of KV cache holds ~80k tokens of the 0.5B: plenty, and kind to a shared machine.
    env = vllm_env(device, cache_root=PROJECT_ROOT / "var" / "vllm-cache", kv_cache_gib=1)
    server = VllmServer(opts, env, log_path=log_path)
    timings = Timings()
    t0 = time.monotonic()
    server.start(timeout_s=STARTUP_TIMEOUT_S)
    timings.startup_s = time.monotonic() - t0
    try:
        yield Served(server.base_url, SERVED_NAME, timings)
    finally:
        server.stop()
        timings.write()


@dataclass
class Call:
    messages: list[Message]
    kwargs: dict[str, Any]
    completion: Completion


class RecordingModel:
    """Passes calls to the real model and keeps what came back (for assertions and timings).
    Like the API's model wrapper, it is handed to the service as its model provider."""

    def __init__(self, inner: ChatModel, timings: Timings, test: str):
        self.inner = inner
        self.model_id = inner.model_id
        self.timings = timings
        self.test = test
        self.log: list[Call] = []

    async def complete(self, messages: list[Message], **kw: Any) -> Completion:
        comp = await self.inner.complete(messages, **kw)
        self.log.append(Call(messages, kw, comp))
        self.timings.calls.append({
            "test": self.test, "kind": "schema" if kw.get("schema") else "logprobs",
            "latency_s": round(comp.latency_s, 3), "prompt_tokens": comp.usage.prompt_tokens,
            "completion_tokens": comp.usage.completion_tokens, "finish_reason": comp.finish_reason})
        return comp
