"""Settings of the HTTP layer only (auth, limits, model guard). Environment: SHOPLENS_*.

The agent's `Settings` (workspace, model, embedder) stay in `agent/settings.py`; these are
read from the environment (or passed in) when the API is served. Every default says why.
"""

from __future__ import annotations

import hashlib
import re

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHOPLENS_", extra="ignore")

    # --- auth ------------------------------------------------------------------------------
    # Comma-separated. An entry "sha256:<64 hex>" is the sha256 of a key (preferred: the
    # plaintext never reaches the server's environment); any other entry is a plaintext key,
    # hashed at startup and then dropped. `python -m ui.api.keys` makes a key and its hash.
    api_keys: SecretStr = SecretStr("")
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
    # Start the embedded model (or connect to SHOPLENS_LLM_BASE_URL) in the background at
    # startup; the server answers (degraded) while it loads.
    start_model: bool = True
    # One model call: a 1.5B model on 2 cores answers a 1-token ranking call in ~5-20 s.
    model_call_timeout_s: float = Field(default=30.0, gt=0)
    # Retries of a call that failed with "unavailable" (connection refused, 5xx, timeout).
    model_retries: int = Field(default=1, ge=0, le=3)
    # Concurrent calls into the model: llama.cpp serves one at a time on 2 cores anyway.
    model_max_concurrency: int = Field(default=2, ge=1)
    # After a call fails every retry, fail fast for this long (no pile-up on a dead server).
    model_cooldown_s: float = Field(default=5.0, ge=0)
    # A whole /v1/next-item request: past this, answer from retrieval fusion (degraded).
    request_timeout_s: float = Field(default=60.0, gt=0)
    # Seconds a 503 tells the client to wait (Retry-After) when the model is loading or down.
    retry_after_s: int = Field(default=5, ge=1)
    # /readyz runs a real 1-token completion at most this often (it is public).
    readyz_cache_s: float = Field(default=5.0, ge=0)

    # --- personal data ---------------------------------------------------------------------
    # HMAC key for pseudonymising user ids at ingest and lookup; unset keeps ids as given.
    # Changing it orphans every stored pseudonymised user.
    pseudonymise_key: SecretStr | None = None
    # Mask e-mails, phone numbers, card numbers and IBANs in review text before storage.
    mask_pii: bool = True

    # --- logs ------------------------------------------------------------------------------
    log_level: str = "INFO"

    def key_hashes(self) -> frozenset[str]:
        """sha256 hex digests of the configured keys (plaintext entries hashed here)."""
        out = set()
        for entry in self.api_keys.get_secret_value().split(","):
            entry = entry.strip()
            if not entry:
                continue
            m = _HASH.match(entry.lower())
            out.add(m.group(1) if m else hash_key(entry))
        return frozenset(out)


def hash_key(key: str) -> str:
    """sha256 hex digest of an API key (keys are random, so no salt or KDF is needed)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
