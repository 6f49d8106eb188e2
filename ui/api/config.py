"""Settings of the HTTP layer only (auth, limits, readiness). Environment: SHOPLENS_*.

The agent's `Settings` (workspace, model, embedder, the model guard, personal data) stay in
`agent/settings.py`; these are read from the environment (or passed in) when the API is served.
Every default says why.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal, get_args

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What a key may do. predict: every prediction route (next-item with its batch, poll and SSE,
# the task routes, /v1/datasets) and the chat at /ui; events:write: POST /v1/events and
# POST /v1/feedback; users: GET/DELETE /v1/users/...; operator: /metrics and
# /v1/feedback/report. /healthz and /readyz need no key (orchestrators send none).
Scope = Literal["predict", "events:write", "users", "operator"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
# A SHOPLENS_API_KEYS entry without scopes keeps what a client key always had; operator stays
# a deliberate grant (SHOPLENS_OPERATOR_KEYS, or ":operator"), so a scraper's key reads no user data.
CLIENT_SCOPES: frozenset[Scope] = frozenset({"predict", "events:write", "users"})
OPERATOR_SCOPES: frozenset[Scope] = frozenset({"operator"})
# "sha256:<64 hex>" optionally followed by ":scope+scope" (the scope names contain ':' themselves,
# so the hash's fixed length is what delimits them).
_ENTRY = re.compile(r"^sha256:([0-9a-f]{64})(?::(.*))?$", re.IGNORECASE)
# Fields that moved to the agent's Settings: passing one here is a mistake, not a no-op.
MOVED_TO_SETTINGS = ("model_call_timeout_s", "model_retries", "model_max_concurrency", "model_cooldown_s",
                     "request_timeout_s", "pseudonymise_key", "mask_pii")


class ApiSettings(BaseSettings):
    # hide_input_in_errors: a validation error must never echo the environment (plaintext keys).
    model_config = SettingsConfigDict(env_prefix="SHOPLENS_", extra="ignore", hide_input_in_errors=True)

    # --- auth ------------------------------------------------------------------------------
    # Comma-separated. An entry "sha256:<64 hex>" is the sha256 of a key (preferred: the
    # plaintext never reaches the server's environment); "sha256:<64 hex>:predict+users" gives
    # that key only those scopes (SCOPES); without scopes a key has CLIENT_SCOPES, as every
    # key had before scopes existed. Any other entry is a plaintext key (no scopes), hashed at
    # startup and then dropped. `python -m ui.api.keys --scope predict` makes a key and its entry.
    api_keys: SecretStr = SecretStr("")
    # Operator keys (the same forms, without scopes): keys with the operator scope only, for
    # /metrics and /v1/feedback/report, so scraping needs a key that reads no user data.
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

    @model_validator(mode="after")
    def _keys_parse(self) -> ApiSettings:
        self.key_scopes()  # a malformed entry is a startup error, not a key that never matches
        return self

    def key_scopes(self) -> dict[str, frozenset[Scope]]:
        """sha256 hex digest -> scopes, for every configured key (plaintext entries hashed here;
        a key listed twice, or in both lists, has the union of its scopes).

        Raises:
            ValueError: a malformed entry, named by its variable and 1-based position (never by
                its text, which may be a plaintext key), with the valid scopes.
        """
        out: dict[str, frozenset[Scope]] = {}
        for var, keys, default in (("SHOPLENS_API_KEYS", self.api_keys, CLIENT_SCOPES),
                                   ("SHOPLENS_OPERATOR_KEYS", self.operator_keys, OPERATOR_SCOPES)):
            for digest, scopes in parse_key_entries(keys.get_secret_value(), default, var=var,
                                                    scoped=var == "SHOPLENS_API_KEYS"):
                out[digest] = out.get(digest, frozenset()) | scopes
        return out

    def unscoped_key_count(self) -> int:
        """How many SHOPLENS_API_KEYS entries name no scopes (and so have CLIENT_SCOPES)."""
        entries = [e.strip() for e in self.api_keys.get_secret_value().split(",") if e.strip()]
        return sum(1 for e in entries if (m := _ENTRY.match(e)) is None or m.group(2) is None)


def parse_key_entries(text: str, default: frozenset[Scope], *, var: str,
                      scoped: bool = True) -> list[tuple[str, frozenset[Scope]]]:
    """(sha256 hex digest, scopes) per entry of a comma-separated key list.

    Args:
        text: the variable's value: entries "sha256:<64 hex>", "sha256:<64 hex>:scope+scope"
            or a plaintext key; empty entries are skipped.
        default: the scopes of an entry that names none.
        var: the variable's name, for error messages.
        scoped: whether entries may name scopes.

    Raises:
        ValueError: "<var> entry <n>: ..." for a malformed hash, an empty or unknown scope, or
            scopes where they are not allowed; the entry's text is never repeated.
    """
    valid = ", ".join(SCOPES)
    out: list[tuple[str, frozenset[Scope]]] = []
    for n, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        where = f"{var} entry {n}"
        m = _ENTRY.match(entry)
        if m is None:
            if entry.lower().startswith("sha256:"):
                raise ValueError(f"{where} starts with 'sha256:' but is not sha256:<64 hex digits>[:scopes]; "
                                 "`python -m ui.api.keys` prints a well-formed entry")
            out.append((hash_key(entry), default))
            continue
        digest, spec = m.group(1).lower(), m.group(2)
        if spec is None:
            out.append((digest, default))
            continue
        if not scoped:
            raise ValueError(f"{where} names scopes; {var} entries are operator keys without scopes: "
                             "put a scoped key in SHOPLENS_API_KEYS (sha256:<hex>:operator)")
        names = [s.strip() for s in spec.split("+")]
        bad = [s for s in names if s not in SCOPES]
        if not spec.strip() or bad:
            what = "has an empty scope" if not spec.strip() or "" in bad else f"has unknown scope {bad[0][:32]!r}"
            raise ValueError(f"{where} {what}; valid scopes: {valid} (joined with '+', e.g. "
                             "sha256:<hex>:predict+events:write)")
        out.append((digest, frozenset(s for s in SCOPES if s in names)))
    return out


def hash_key(key: str) -> str:
    """sha256 hex digest of an API key (keys are random, so no salt or KDF is needed)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
