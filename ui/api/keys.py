"""Make an API key: ``python -m ui.api.keys [--scope SCOPE]...`` prints a new key and the entry
for SHOPLENS_API_KEYS (its sha256, then the scopes). Give the key to the client; keep only the
entry on the server.

    python -m ui.api.keys --scope predict                 # a recommender: predictions only
    python -m ui.api.keys --scope events:write            # an event pipeline
    python -m ui.api.keys --scope users                   # a privacy tool: export and delete
    python -m ui.api.keys --scope operator                # a Prometheus scraper
    python -m ui.api.keys                                 # no --scope: predict, events:write, users
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Sequence

from ui.api.config import CLIENT_SCOPES, SCOPES, hash_key


def new_key(scopes: Sequence[str] = ()) -> tuple[str, str]:
    """(key, entry): 32 random bytes, URL-safe, prefixed ``sl_``; the entry is
    ``sha256:<hex>`` without scopes (the key then has `CLIENT_SCOPES`) or
    ``sha256:<hex>:scope+scope`` (in `SCOPES` order, each once).

    Raises:
        ValueError: a scope not in `SCOPES`.
    """
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ValueError(f"unknown scope {bad[0]!r}; valid scopes: {', '.join(SCOPES)}")
    key = "sl_" + secrets.token_urlsafe(32)
    entry = f"sha256:{hash_key(key)}"
    if scopes:
        entry += ":" + "+".join(s for s in SCOPES if s in scopes)
    return key, entry


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ui.api.keys", description="Make an API key and its SHOPLENS_API_KEYS entry.",
        epilog="Example: python -m ui.api.keys --scope predict --scope events:write")
    parser.add_argument("--scope", action="append", choices=SCOPES, default=[], metavar="SCOPE",
                        help=f"what the key may do, repeatable: {', '.join(SCOPES)} (default: "
                        f"{', '.join(s for s in SCOPES if s in CLIENT_SCOPES)})")
    args = parser.parse_args(argv)
    k, entry = new_key(args.scope)
    print(f"key (give to the client):        {k}")
    print(f"SHOPLENS_API_KEYS entry (server): {entry}")


if __name__ == "__main__":
    main()
