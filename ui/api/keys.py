"""Make an API key: ``python -m ui.api.keys`` prints a new key and the entry for
SHOPLENS_API_KEYS (its sha256). Give the key to the client; keep only the hash on the server."""

from __future__ import annotations

import secrets

from ui.api.config import hash_key


def new_key() -> tuple[str, str]:
    """(key, "sha256:<hex>"): 32 random bytes, URL-safe, prefixed ``sl_``."""
    key = "sl_" + secrets.token_urlsafe(32)
    return key, f"sha256:{hash_key(key)}"


if __name__ == "__main__":
    k, h = new_key()
    print(f"key (give to the client):        {k}")
    print(f"SHOPLENS_API_KEYS entry (server): {h}")
