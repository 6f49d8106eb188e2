"""API keys (stored hashed, compared in constant time) with scopes, and a per-key token-bucket
rate limit.

Routes declare the scope they need as ``Security(require_key, scopes=["users"])`` (see
`ui.api.deps`): no key or none configured is 401, an unknown key 403 ``invalid_api_key``, a
key without the scope 403 ``insufficient_scope`` naming it. The chat at /ui is checked by the
same `Authenticator` (`ui.api.chat_gate`).
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from ui.api.config import SCOPES, ApiSettings, Scope, hash_key
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
    """Checks a key against the configured key hashes and their scopes (`ApiSettings.key_scopes`):
    the one check behind every protected route and the chat at /ui."""

    def __init__(self, settings: ApiSettings):
        self.scopes: dict[str, frozenset[Scope]] = settings.key_scopes()
        self.hashes = sorted(self.scopes)
        self.allow_anonymous = settings.allow_anonymous and not self.hashes

    def _match(self, digest: str) -> str | None:
        # Compare against every hash, without an early exit, so timing says nothing.
        match = None
        for h in self.hashes:
            if hmac.compare_digest(digest, h):
                match = h
        return match

    def identify(self, key: str | None) -> str:
        """The sha256 hex digest of a configured key.

        Raises:
            ApiError: 401 no key (or none configured), 403 a key that matches none.
        """
        if not self.hashes:
            raise ApiError(401, "no API keys are configured on this server: the operator sets "
                           "SHOPLENS_API_KEYS (see docs/api.md)", code="no_keys_configured",
                           headers={"WWW-Authenticate": "Bearer"})
        if not key:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        match = self._match(hash_key(key))
        if match is None:
            raise ApiError(403, "invalid API key", code="invalid_api_key")
        return match

    def check_scopes(self, digest: str, needed: Iterable[str]) -> str:
        """The key id (first 12 hex of its hash) of a configured key that has every `needed` scope.

        Raises:
            ApiError: 403 ``insufficient_scope`` naming the first scope the key lacks.
        """
        have = self.scopes.get(digest, frozenset())
        for scope in needed:
            if scope not in have:
                raise ApiError(403, f"this key lacks the `{scope}` scope this route needs (it has: "
                               f"{', '.join(s for s in SCOPES if s in have) or 'none'}); the operator grants "
                               "scopes in SHOPLENS_API_KEYS (docs/api.md#scopes)", code="insufficient_scope",
                               headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'})
        return digest[:12]

    def authorize(self, key: str | None, needed: Iterable[str]) -> str:
        """The key id of `key` when it is configured and has every `needed` scope; "anonymous"
        when the server runs without keys and SHOPLENS_ALLOW_ANONYMOUS is set.

        Raises:
            ApiError: 401 no key (or none configured), 403 an unknown key (``invalid_api_key``)
                or one without a needed scope (``insufficient_scope``, naming it).
        """
        if self.allow_anonymous:
            return "anonymous"
        return self.check_scopes(self.identify(key), needed)


async def require_key(
    request: Request, security_scopes: SecurityScopes,
    creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),  # noqa: B008
) -> str:
    """FastAPI dependency, used as ``Security(require_key, scopes=[...])``: authenticate the
    bearer key, check it has the route's scopes, then rate-limit; returns the key id.

    A known key's id is on ``request.state.key_id`` (the access and audit lines) even when the
    key is refused for a scope it lacks."""
    api = request.app.state.api
    auth: Authenticator = api.auth
    if auth.allow_anonymous:
        key_id = request.state.key_id = "anonymous"
    else:
        digest = auth.identify(creds.credentials if creds else None)
        request.state.key_id = digest[:12]
        key_id = auth.check_scopes(digest, security_scopes.scopes)
    api.limiter.check(key_id)
    return key_id
