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
    """Checks `Authorization: Bearer <key>` against the configured key hashes: client keys for
    the data routes, operator keys (a separate list) for /metrics."""

    def __init__(self, settings: ApiSettings):
        self.hashes = sorted(settings.key_hashes())
        self.operator_hashes = sorted(settings.operator_key_hashes())
        self.allow_anonymous = settings.allow_anonymous and not self.hashes

    @staticmethod
    def _match(digest: str, hashes: list[str]) -> str | None:
        # Compare against every hash, without an early exit, so timing says nothing.
        match = None
        for h in hashes:
            if hmac.compare_digest(digest, h):
                match = h
        return match

    @staticmethod
    def _digest(creds: HTTPAuthorizationCredentials | None) -> str:
        if creds is None or not creds.credentials:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        return hash_key(creds.credentials)

    def key_id(self, creds: HTTPAuthorizationCredentials | None) -> str:
        """A short, non-secret id of the caller's client key (first 12 hex of its hash) for logs
        and rate limits.

        Raises:
            ApiError: 401 no key (or none configured), 403 a key that matches none.
        """
        if self.allow_anonymous:
            return "anonymous"
        if not self.hashes:
            raise ApiError(401, "no API keys are configured on this server: the operator sets "
                           "SHOPLENS_API_KEYS (see docs/api.md)", code="no_keys_configured",
                           headers={"WWW-Authenticate": "Bearer"})
        match = self._match(self._digest(creds), self.hashes)
        if match is None:
            raise ApiError(403, "invalid API key", code="invalid_api_key")
        return match[:12]

    def operator_id(self, creds: HTTPAuthorizationCredentials | None) -> str:
        """The id of the caller's operator key (first 12 hex of its hash).

        Raises:
            ApiError: 401 no key (or no operator keys configured), 403 a client key
                (``operator_key_required``) or a key that matches none.
        """
        if self.allow_anonymous and not self.operator_hashes:
            return "anonymous"
        if not self.operator_hashes:
            raise ApiError(401, "no operator keys are configured on this server: the operator sets "
                           "SHOPLENS_OPERATOR_KEYS (see docs/api.md)", code="no_keys_configured",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = self._digest(creds)
        match = self._match(digest, self.operator_hashes)
        if match is not None:
            return match[:12]
        if self._match(digest, self.hashes) is not None:
            raise ApiError(403, "this is a client key; this route needs an operator key "
                           "(SHOPLENS_OPERATOR_KEYS)", code="operator_key_required")
        raise ApiError(403, "invalid API key", code="invalid_api_key")


async def require_key(
    request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),  # noqa: B008
) -> str:
    """FastAPI dependency: authenticate a client key, then rate-limit; returns the key id."""
    api = request.app.state.api
    key_id = api.auth.key_id(creds)
    request.state.key_id = key_id
    api.limiter.check(key_id)
    return key_id


async def require_operator(
    request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),  # noqa: B008
) -> str:
    """FastAPI dependency: authenticate an operator key, then rate-limit; returns the key id."""
    api = request.app.state.api
    key_id = api.auth.operator_id(creds)
    request.state.key_id = key_id
    api.limiter.check(key_id)
    return key_id
