"""The embedded model server: llama-cpp-python's OpenAI server, plus cheap next-token logprobs.

Run as ``python -m agent.llm.servers.llama_app <llama_cpp.server flags>`` (the same flags as
``python -m llama_cpp.server``). Everything is llama-cpp-python's server except one case:

* A chat completion with ``logprobs=true`` and ``max_tokens`` <= 1 (every verbalizer, yes/no and
  pointwise scoring call ShopLens makes) is answered here from the **last position's logits
  only**. llama-cpp-python 0.3.36 answers such a request only with ``logits_all=True``, which
  keeps a (n_ctx x vocab) logits matrix, copies every prompt position's logits out of llama.cpp
  and log-softmaxes all of them on every call (~4 s per cold 1k-token call on 2 cores, and ~15%
  slower prompt evaluation). Here the model runs with ``logits_all=False``; the prompt is
  rendered with the model's own chat template, its longest common prefix with the tokens already
  in the KV cache is kept (so N candidate prompts sharing one history prefix evaluate the prefix
  once), the rest is evaluated, and the top-N log-probabilities of the next token come from one
  vocabulary-sized row. The answer is an ordinary OpenAI ``chat.completion`` (one token), with
  ``usage.prompt_tokens_details.cached_tokens`` saying how much of the prompt was reused.
* A chat completion with ``logprobs=true`` and ``max_tokens`` > 1 (the joint review call of
  `agent.tasks.sentiment`: a label word, then aspect lines) gets the same first-token
  log-probabilities, then llama-cpp-python's own greedy generation continues from the evaluated
  prompt (its generate() keeps the common prefix, so the prompt is not evaluated twice). The
  answer's ``logprobs.content`` holds the **first generated token only** (the rest would need
  ``logits_all``); ShopLens reads only that position. ``logprobs`` together with a grammar or
  ``response_format`` answers 400.

The same requests to vLLM (``--max-logprobs``, prefix caching) are already cheap: the adapter
sends them unchanged, so the model seam does not know which server it talks to.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from typing import Any, cast

import numpy as np

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # the OpenAI API's cap; vLLM's default --max-logprobs


def is_next_token_request(body: dict[str, Any]) -> bool:
    """True for the requests answered here: logprobs asked, no grammar, no tools, no streaming
    (pure; unit-tested). Whether text follows the first token is `max_tokens` (see
    `generated_tokens`)."""
    if not body.get("logprobs") or body.get("stream"):
        return False
    return not (body.get("response_format") or body.get("grammar") or body.get("tools") or body.get("functions"))


def generated_tokens(body: dict[str, Any]) -> int:
    """How many tokens a request may generate (the OpenAI default when unset: 16)."""
    return max(1, int(body.get("max_tokens") or 16))


def log_softmax_top(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The `n` most likely token ids of one logits row ``(vocab,)`` with their natural-log
    probabilities, best first; ties in the lower id first, so answers are reproducible (pure;
    unit-tested against a hand-computed softmax)."""
    row = logits.astype(np.float64, copy=False)
    m = float(row.max())
    lse = m + math.log(float(np.exp(row - m).sum()))
    n = max(1, min(n, row.shape[0]))
    idx = np.sort(np.argpartition(-row, n - 1)[:n])  # ascending ids, so ties keep the lower id first
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return [(int(i), float(row[i]) - lse) for i in idx]


def common_prefix(a: Any, b: list[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class NextTokenScorer:
    """Next-token log-probabilities over a llama.cpp model with prefix reuse (not thread-safe:
    callers hold llama-cpp-python's model lock)."""

    def __init__(self, llama: Any):
        from llama_cpp import llama_chat_format

        self.llama = llama
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError("the GGUF has no tokenizer.chat_template; cannot render chat prompts")
        model = llama._model
        eos, bos = llama.token_eos(), llama.token_bos()
        self.formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt tokens llama-cpp-python's chat handler would evaluate for `messages`."""
        res = self.formatter(messages=cast(Any, messages))  # OpenAI-shaped dicts, as the server passes
        return list(self.llama.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special,
                                        special=True))

    def top_logprobs(self, messages: list[dict[str, Any]], n: int) -> tuple[list[tuple[str, float]], int, int]:
        """(top-`n` (token text, logprob) of the next token, prompt tokens, reused tokens).

        Raises:
            ValueError: the prompt does not fit the context window.
        """
        import llama_cpp

        llama = self.llama
        toks = self.tokens(messages)
        if len(toks) >= llama.n_ctx():
            raise ValueError(f"prompt of {len(toks)} tokens does not fit n_ctx={llama.n_ctx()}")
        reuse = min(common_prefix(llama.input_ids[: llama.n_tokens], toks), len(toks) - 1)
        llama.n_tokens = reuse  # eval() drops the KV cache beyond n_tokens, then decodes the rest
        llama.eval(toks[reuse:])
        ptr = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),))
        top = log_softmax_top(row, n)
        out = [(llama.detokenize([i], special=True).decode("utf-8", errors="replace"), lp) for i, lp in top]
        return out, len(toks), reuse


def completion_body(model: str, top: list[tuple[str, float]], prompt_tokens: int, cached: int,
                    text: str | None = None, completion_tokens: int = 1,
                    finish_reason: str = "length") -> dict[str, Any]:
    """An OpenAI ``chat.completion`` with the first token's top log-probabilities (pure).

    Args:
        top: (token text, logprob) of the first generated token, best first.
        text: the whole generated text when more than one token was generated (default: the
            top token alone).
    """
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in top]
    first = entries[0]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": first["token"] if text is None else text},
            "logprobs": {"content": [{**first, "top_logprobs": entries}]},
            "finish_reason": finish_reason,
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }


def _error(status: int, message: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                              "code": None}}


class NextTokenLogprobs:
    """ASGI middleware: answers next-token logprob requests, passes everything else through."""

    def __init__(self, app: Any):
        self.app = app
        self._scorers: dict[int, NextTokenScorer] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        chunks = []
        more = True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("logprobs") and not body.get("stream") \
                and not is_next_token_request(body):
            await _send_json(send, *_error(400, "this server returns log-probabilities only for free "
                                           "text: drop response_format/grammar/tools or logprobs",
                                           "logprobs"))
            return
        if not (isinstance(body, dict) and is_next_token_request(body)):
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": raw, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await _send_json(send, *await self._answer(body))

    async def _answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        import contextlib

        from llama_cpp.server.app import get_llama_proxy
        from starlette.concurrency import run_in_threadpool

        n = int(body.get("top_logprobs") or 1)
        if not 1 <= n <= MAX_TOP_LOGPROBS:
            return _error(400, f"top_logprobs must be in [1, {MAX_TOP_LOGPROBS}], got {n}", "top_logprobs")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list", "messages")
        async with contextlib.asynccontextmanager(get_llama_proxy)() as proxy:
            if proxy is None:
                return 503, {"error": {"message": "model not loaded", "type": "service_unavailable",
                                       "param": None, "code": None}}
            llama = proxy(body.get("model"))
            scorer = self._scorers.get(id(llama))
            if scorer is None:
                scorer = self._scorers[id(llama)] = NextTokenScorer(llama)
            try:
                top, n_prompt, cached = await run_in_threadpool(scorer.top_logprobs, messages, n)
            except ValueError as e:
                return _error(400, str(e), "messages")
            max_tokens = generated_tokens(body)
            if max_tokens == 1:
                return 200, completion_body(str(body.get("model") or "model"), top, n_prompt, cached)
            # llama-cpp-python's generate() keeps the prompt just evaluated (common prefix), so this
            # re-evaluates one token and then decodes greedily, under the same model lock.
            gen = await run_in_threadpool(lambda: llama.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=0.0, stop=body.get("stop")))
        choice, usage = gen["choices"][0], gen.get("usage") or {}
        return 200, completion_body(
            str(body.get("model") or "model"), top, n_prompt, cached, text=choice["message"].get("content") or "",
            completion_tokens=int(usage.get("completion_tokens") or 1),
            finish_reason=str(choice.get("finish_reason") or "stop"))


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def main() -> None:  # pragma: no cover - the server process; exercised by the real-model tests
    """``python -m llama_cpp.server``'s command line, with `NextTokenLogprobs` in front."""
    import argparse
    import os
    import sys

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.cli import add_args_from_model
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

    parser = argparse.ArgumentParser(description="ShopLens embedded model server (llama-cpp-python)")
    add_args_from_model(parser, Settings)
    args = parser.parse_args()
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:  # as llama_cpp.server.cli.parse_model_from_args, whose stubs type the result as a class
        server_settings = ServerSettings(**{k: v for k, v in given.items() if k in ServerSettings.model_fields})
        model_settings = [ModelSettings(**{k: v for k, v in given.items() if k in ModelSettings.model_fields})]
    except Exception as e:  # noqa: BLE001 - argparse-style failure: message and usage
        print(e, file=sys.stderr)
        parser.print_help()
        sys.exit(2)
    app = create_app(server_settings=server_settings, model_settings=model_settings)
    uvicorn.run(NextTokenLogprobs(app), host=os.getenv("HOST", server_settings.host),
                port=int(os.getenv("PORT", server_settings.port)), log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    main()
