"""Shared test setup: the network is blocked for every test except loopback.

Unit tests use fakes (`agent.llm.fake.FakeModel`, `retrieval.embedder.HashingEmbedder`) and must
never reach the outside world. Tests marked ``real_model`` talk to the embedded server on
127.0.0.1, so loopback (and Unix sockets) stay allowed.

`pg_url` is a fresh database on a real PostgreSQL server that this test session starts
(`tests.pg`); without PostgreSQL installed those tests skip with the reason, unless
SHOPLENS_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.pg import PostgresCluster, PostgresUnavailable


class NetworkBlockedError(OSError):
    """A unit test tried to open a connection to a non-loopback address."""


def is_loopback(address: Any) -> bool:
    """True for Unix-socket paths and for loopback host addresses (127.0.0.0/8, ::1, localhost)."""
    if isinstance(address, str | bytes):  # AF_UNIX path
        return True
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:  # a host name other than localhost
        return False


@pytest.fixture(autouse=True)
def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def _refuse(address: Any) -> None:
        raise NetworkBlockedError(
            f"network access to {address!r} is blocked in tests; only loopback is allowed "
            "(use agent.llm.fake.FakeModel or a server on 127.0.0.1)"
        )

    def connect(self: socket.socket, address: Any) -> None:
        if not is_loopback(address):
            _refuse(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not is_loopback(address):
            _refuse(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


def _no_postgres(reason: str) -> None:
    if os.environ.get("SHOPLENS_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"SHOPLENS_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL server for the session (~2 s to start), removed at the end."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _no_postgres("psycopg is not installed: pip install -e '.[pg]'")
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as e:
        _no_postgres(str(e))
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a new, empty database (password-less, over the cluster's Unix socket), dropped
    after the test. Its default collation is ICU en-US, as a production database's often is, so
    a query that sorts by the database's collation instead of by byte shows up."""
    url = pg_cluster.create_database(icu_locale="en-US")
    yield url
    pg_cluster.drop_database(url)
