"""API keys (stored hashed, compared in constant time) and a per-key token-bucket rate limit."""

from __future__ import annotations

import hmac
import math
import threading
import time
from dataclasses import dataclass, field

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ui.api.config import ApiSettings, hash_key
from ui.api.errors import ApiError

# Declares the scheme in the OpenAPI document; the checking is ours (401 vs 403, envelope).
bearer_scheme = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


@dataclass
class TokenBucket:
    """`rate` tokens per second up to `burst`; one token per request."""

    rate: float
    burst: int
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One bucket per key id; thread-safe (the limiter is shared by every request)."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def check(self, key_id: str) -> None:
        """Raises ApiError 429 with Retry-After (whole seconds, >= 1) when over the limit."""
        if self.rate <= 0:
            return
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = TokenBucket(self.rate, self.burst)
            wait = bucket.take(time.monotonic())
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise ApiError(429, f"rate limit of {self.rate:g} requests/s (burst {self.burst}) exceeded; "
                           f"retry in {retry} s", code="rate_limited", headers={"Retry-After": str(retry)})


class Authenticator:
    """Checks `Authorization: Bearer <key>` against the configured key hashes."""

    def __init__(self, settings: ApiSettings):
        self.hashes = sorted(settings.key_hashes())
        self.allow_anonymous = settings.allow_anonymous and not self.hashes

    def key_id(self, creds: HTTPAuthorizationCredentials | None) -> str:
        """A short, non-secret id of the caller's key (first 12 hex of its hash) for logs and
        rate limits.

        Raises:
            ApiError: 401 no key (or none configured), 403 a key that matches none.
        """
        if self.allow_anonymous:
            return "anonymous"
        if not self.hashes:
            raise ApiError(401, "no API keys are configured on this server: the operator sets "
                           "SHOPLENS_API_KEYS (see docs/api.md)", code="no_keys_configured",
                           headers={"WWW-Authenticate": "Bearer"})
        if creds is None or not creds.credentials:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        digest = hash_key(creds.credentials)
        # Compare against every hash, without an early exit, so timing says nothing.
        match = None
        for h in self.hashes:
            if hmac.compare_digest(digest, h):
                match = h
        if match is None:
            raise ApiError(403, "invalid API key", code="invalid_api_key")
        return match[:12]


async def require_key(
    request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),  # noqa: B008
) -> str:
    """FastAPI dependency: authenticate, then rate-limit; returns the key id."""
    state = request.app.state.api
    key_id = state.auth.key_id(creds)
    request.state.key_id = key_id
    state.limiter.check(key_id)
    return key_id
