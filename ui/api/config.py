"""Settings of the HTTP layer only (auth, limits, readiness). Environment: SHOPLENS_*.

The agent's `Settings` (workspace, model, embedder, the model guard, personal data) stay in
`agent/settings.py`; these are read from the environment (or passed in) when the API is served.
Every default says why.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
# Fields that moved to the agent's Settings: passing one here is a mistake, not a no-op.
MOVED_TO_SETTINGS = ("model_call_timeout_s", "model_retries", "model_max_concurrency", "model_cooldown_s",
                     "request_timeout_s", "pseudonymise_key", "mask_pii")


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHOPLENS_", extra="ignore")

    # --- auth ------------------------------------------------------------------------------
    # Comma-separated. An entry "sha256:<64 hex>" is the sha256 of a key (preferred: the
    # plaintext never reaches the server's environment); any other entry is a plaintext key,
    # hashed at startup and then dropped. `python -m ui.api.keys` makes a key and its hash.
    api_keys: SecretStr = SecretStr("")
    # Operator keys (same forms, comma-separated): the only keys /metrics accepts. A client key
    # gets 403 there, so scraping needs a key that reads no user data.
    operator_keys: SecretStr = SecretStr("")
    # Without keys every protected route answers 401; this opens them (local development only).
    allow_anonymous: bool = False
    # /docs and /openapi.json describe the API and hold no data: public by default.
    public_docs: bool = True

    # --- limits ----------------------------------------------------------------------------
    # Per-key token bucket: sustained requests per second and burst size; 0 disables it.
    rate_limit_rps: float = Field(default=20.0, ge=0)
    rate_limit_burst: int = Field(default=40, ge=1)
    # A request body bigger than this is refused with 413 before it is parsed (10k events of
    # ~300 bytes each fit in ~3 MB).
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Events per ingest batch and per inline history; 10,000 covers a heavy buyer's lifetime.
    max_events_per_request: int = Field(default=10_000, ge=1)
    # Review text per event; longer is refused with 413 (the schema's hard cap is 20,000).
    max_text_chars: int = Field(default=5_000, ge=1)
    # Texts per /v1/sentiment request: each is one model call (two with aspects), so a batch
    # of 100 takes minutes on a small local model; larger batches are refused with 413.
    max_sentiment_texts: int = Field(default=100, ge=1)

    # --- the model, as the API uses it ------------------------------------------------------
    # The guard's bounds (SHOPLENS_MODEL_CALL_TIMEOUT_S, _MODEL_RETRIES, _MODEL_MAX_CONCURRENCY,
    # _MODEL_COOLDOWN_S) and the request deadline (SHOPLENS_REQUEST_TIMEOUT_S) are the agent's
    # `Settings` (agent/settings.py): every surface uses the same ones.
    # Start the embedded model (or connect to SHOPLENS_LLM_BASE_URL) in the background at
    # startup; the server answers (degraded) while it loads.
    start_model: bool = True
    # Seconds a 503 tells the client to wait (Retry-After) when the model is loading or down.
    retry_after_s: int = Field(default=5, ge=1)
    # /readyz runs a real 1-token completion at most this often (it is public).
    readyz_cache_s: float = Field(default=5.0, ge=0)
    # ... and waits at most this long for it (a probe must not hang as long as a real call may).
    readyz_timeout_s: float = Field(default=30.0, gt=0)

    # --- precomputed answers (`shoplens precompute`) ---------------------------------------
    # Refresh stored next-item answers in the background when POST /v1/events marks their users
    # stale (agent.app.precompute.RefreshWorker, in the model's batch lane). Off: stale answers
    # are served flagged `stale` until the next `shoplens precompute`.
    refresh_worker: bool = True
    # Seconds between looks at an empty refresh queue: a refresh starts at most this long after
    # the events arrive; one indexed SQLite read per look.
    refresh_poll_s: float = Field(default=2.0, gt=0)
    # Users per POST /v1/next-item/batch. Stored answers and answers without the model take
    # milliseconds each; with use_llm each user is a full model answer (seconds to a minute on
    # a CPU model), so keep batches that ask for the model small.
    max_batch_users: int = Field(default=100, ge=1, le=10_000)

    # --- personal data ---------------------------------------------------------------------
    # SHOPLENS_PSEUDONYMISE_KEY and SHOPLENS_MASK_PII are the agent's `Settings` too: the
    # service pseudonymises and masks for every surface.

    # --- logs ------------------------------------------------------------------------------
    log_level: str = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _not_moved(cls, data: Any) -> Any:
        moved = [k for k in MOVED_TO_SETTINGS if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(f"{', '.join(moved)}: set on the agent's Settings (agent/settings.py), "
                             "not ApiSettings; the environment names are unchanged")
        return data

    def key_hashes(self) -> frozenset[str]:
        """sha256 hex digests of the client keys (plaintext entries hashed here)."""
        return _hashes(self.api_keys)

    def operator_key_hashes(self) -> frozenset[str]:
        """sha256 hex digests of the operator keys (plaintext entries hashed here)."""
        return _hashes(self.operator_keys)


def _hashes(keys: SecretStr) -> frozenset[str]:
    out = set()
    for entry in keys.get_secret_value().split(","):
        entry = entry.strip()
        if not entry:
            continue
        m = _HASH.match(entry.lower())
        out.add(m.group(1) if m else hash_key(entry))
    return frozenset(out)


def hash_key(key: str) -> str:
    """sha256 hex digest of an API key (keys are random, so no salt or KDF is needed)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
