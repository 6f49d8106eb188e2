"""A response cache for model calls, so re-running an unchanged eval configuration is free.

Entries live in one SQLite file (``<workspace>/cache/llm_responses.sqlite3`` by default), keyed
by ``sha256(model sha256 + rendered messages + request params)``. The model's file hash (not
only its name) is in the key, so a different GGUF never answers from another model's cache.

:class:`CachedModel` wraps any ``ChatModel`` and keeps counters (hits, misses); :class:`Recorder`
wraps a model for one ranking case and keeps every completion, so the runner can write the raw
responses to ``cases.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.llm.base import ChatModel, Completion, Message, Usage


def request_key(
    model_sha256: str, messages: list[Message], params: dict[str, Any]
) -> str:
    """The cache key: sha256 over the model hash, the rendered messages and the request params."""
    blob = json.dumps(
        {"model": model_sha256, "messages": messages, "params": params},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def completion_to_dict(c: Completion) -> dict[str, Any]:
    """A JSON-safe dict of a completion (text, usage, latency in seconds, top_logprobs)."""
    return {
        "text": c.text,
        "usage": asdict(c.usage),
        "latency_s": round(c.latency_s, 4),
        "top_logprobs": c.top_logprobs,
        "finish_reason": c.finish_reason,
        "model": c.model,
    }


def completion_from_dict(d: dict[str, Any]) -> Completion:
    return Completion(
        text=d["text"],
        usage=Usage(**d.get("usage", {})),
        latency_s=float(d.get("latency_s", 0.0)),
        top_logprobs=d.get("top_logprobs", []),
        finish_reason=d.get("finish_reason"),
        model=d.get("model", ""),
    )


class ResponseCache:
    """SQLite key -> completion JSON. Safe to share between runs; one writer at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "completion TEXT NOT NULL, created REAL DEFAULT (unixepoch()))"
        )
        self._conn.commit()

    def get(self, key: str) -> Completion | None:
        row = self._conn.execute("SELECT completion FROM responses WHERE key = ?", (key,)).fetchone()
        return completion_from_dict(json.loads(row[0])) if row else None

    def put(self, key: str, model: str, completion: Completion) -> None:
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses (key, model, completion) VALUES (?,?,?)",
                (key, model, json.dumps(completion_to_dict(completion))),
            )

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        self._conn.close()


@dataclass
class CachedModel:
    """A ``ChatModel`` that answers from :class:`ResponseCache` when it can.

    Args:
        model: the real model (only called on a miss).
        cache: the response cache.
        model_sha256: the model file's hash (the embedded GGUF's sha256; for a remote server,
            whatever identifies the weights, e.g. the served model name).
    """

    model: ChatModel
    cache: ResponseCache
    model_sha256: str
    hits: int = 0
    misses: int = 0

    @property
    def model_id(self) -> str:
        return self.model.model_id

    async def complete(
        self,
        messages: list[Message],
        *,
        schema: dict[str, Any] | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> Completion:
        params = {"schema": schema, "max_tokens": max_tokens, "temperature": temperature,
                  "top_logprobs": top_logprobs}
        key = request_key(self.model_sha256, messages, params)
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        comp = await self.model.complete(
            messages, schema=schema, max_tokens=max_tokens, temperature=temperature,
            top_logprobs=top_logprobs,
        )
        self.cache.put(key, self.model_id, comp)
        return comp


@dataclass
class Recorder:
    """Wraps a model for one case and keeps what each call sent and got back."""

    model: Any
    calls: list[dict[str, Any]] = field(default_factory=list)
    first_messages: list[Message] | None = None

    @property
    def model_id(self) -> str:
        return str(self.model.model_id)

    async def complete(self, messages: list[Message], **kwargs: Any) -> Completion:
        if self.first_messages is None:
            self.first_messages = messages
        hits_before = getattr(self.model, "hits", 0)
        comp = await self.model.complete(messages, **kwargs)
        rec = completion_to_dict(comp)
        rec["cached"] = getattr(self.model, "hits", 0) > hits_before
        self.calls.append(rec)
        return comp
