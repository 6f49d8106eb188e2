"""Key scopes (predict, events:write, users, operator) on every protected route, the key
entries that grant them (old bare hashes included), the key maker, and the audit line that
every read or delete of a user's data leaves. The app runs in-process (TestClient) over a
small events-only dataset, without a model."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from typer.testing import CliRunner

from agent.app.runtime import Runtime
from agent.domain.pii import pseudonymise
from agent.domain.schemas import BehaviorEvent
from agent.settings import Settings
from ui.api import ApiSettings, create_app
from ui.api.config import SCOPES
from ui.api.keys import main as keys_main
from ui.api.keys import new_key
from ui.api.middleware import JsonFormatter
from ui.cli import app as cli_app

DS = "scoped-shop"
T0 = datetime(2011, 10, 1, 9, tzinfo=UTC)
PSEUDO_KEY = "audit-test-secret"


def _entry(key: str, scopes: str | None = None) -> str:
    h = f"sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    return f"{h}:{scopes}" if scopes else h


KEYS = {  # key -> its SHOPLENS_API_KEYS entry
    "k-predict": _entry("k-predict", "predict"),
    "k-users": _entry("k-users", "users"),
    "k-writer": _entry("k-writer", "events:write"),
    "k-ops": _entry("k-ops", "operator"),
    "k-legacy": _entry("k-legacy"),  # the format before scopes: a bare hash
    "k-plain": "k-plain",  # a plaintext entry, as before
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _events(user: str, n: int = 3) -> list[BehaviorEvent]:
    return [BehaviorEvent(user_id=user, item_id=f"i{d}", event_type="purchase", quantity=1,
                          timestamp=T0 + timedelta(days=d)) for d in range(n)]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[Runtime, TestClient]]:
    rt = Runtime(Settings(workspace=tmp_path, embedder="hashing-64", pseudonymise_key=SecretStr(PSEUDO_KEY)))
    for u in ("u1", "u2", "u3", "u4"):  # stored pseudonymised, as POST /v1/events stores them
        rt.store.add_events(DS, [e.model_copy(update={"user_id": pseudonymise(u, PSEUDO_KEY.encode())})
                                 for e in _events(u)])
    api = ApiSettings(api_keys=",".join(KEYS.values()), operator_keys="k-op-legacy", rate_limit_rps=0,
                      readyz_cache_s=0, start_model=False, refresh_worker=False)
    with TestClient(create_app(rt, api)) as c:
        yield rt, c


def assert_scope_refused(r: Any, scope: str) -> None:
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_scope" and err["type"] == "permission_error", err
    assert f"`{scope}` scope" in err["message"], err
    assert r.headers["www-authenticate"] == f'Bearer error="insufficient_scope", scope="{scope}"'


# Every protected route, with the scope it needs and a request that passes validation.
ROUTES: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("predict", "POST", "/v1/next-item", {"dataset": DS, "user_id": "u1", "k": 2, "use_llm": False}),
    ("predict", "POST", "/v1/next-item/batch", {"dataset": DS, "user_ids": ["u1"], "k": 2}),
    ("predict", "GET", "/v1/next-item/0123456789abcdef", None),
    ("predict", "GET", "/v1/next-item/0123456789abcdef/events", None),
    ("predict", "POST", "/v1/churn", {"dataset": DS, "user_id": "u1", "use_llm": False}),
    ("predict", "POST", "/v1/sentiment", {"texts": ["fine"], "use_llm": False}),
    ("predict", "GET", "/v1/datasets", None),
    ("events:write", "POST", "/v1/events", {"dataset": DS, "events": [
        {"user_id": "u9", "item_id": "i1", "event_type": "view", "timestamp": "2011-10-05T10:00:00Z"}]}),
    ("events:write", "POST", "/v1/feedback", {"recommendation_id": "nope", "item_id": "i1", "kind": "click"}),
    ("users", "GET", f"/v1/users/u2/events?dataset={DS}", None),
    ("users", "DELETE", f"/v1/users/u3?dataset={DS}", None),
    ("operator", "GET", "/metrics", None),
    ("operator", "GET", "/v1/feedback/report", None),
]
OWNER = {"predict": "k-predict", "events:write": "k-writer", "users": "k-users", "operator": "k-ops"}


def test_a_predict_only_key_is_refused_user_deletion_and_metrics_naming_the_scope(
        client: tuple[Runtime, TestClient]) -> None:
    rt, c = client
    assert_scope_refused(c.delete("/v1/users/u1", params={"dataset": DS}, headers=bearer("k-predict")), "users")
    assert_scope_refused(c.get("/metrics", headers=bearer("k-predict")), "operator")
    assert rt.store.has_user(DS, pseudonymise("u1", PSEUDO_KEY.encode()))  # nothing was deleted
    assert c.post("/v1/churn", json={"dataset": DS, "user_id": "u1", "use_llm": False},
                  headers=bearer("k-predict")).status_code == 200


def test_a_users_key_can_read_and_delete_and_nothing_else(client: tuple[Runtime, TestClient]) -> None:
    rt, c = client
    r = c.get("/v1/users/u1/events", params={"dataset": DS}, headers=bearer("k-users"))
    assert r.status_code == 200 and r.json()["total"] == 3, r.text
    r = c.delete("/v1/users/u1", params={"dataset": DS}, headers=bearer("k-users"))
    assert r.status_code == 200 and r.json()["deleted_events"] == 3, r.text
    assert not rt.store.has_user(DS, pseudonymise("u1", PSEUDO_KEY.encode()))
    assert_scope_refused(c.post("/v1/next-item", json={"dataset": DS, "user_id": "u2"}, headers=bearer("k-users")),
                         "predict")
    assert_scope_refused(c.post("/v1/events", json={"dataset": DS, "events": []}, headers=bearer("k-users")),
                         "events:write")


@pytest.mark.parametrize(("scope", "method", "path", "body"), ROUTES, ids=[f"{m} {p}" for _, m, p, _ in ROUTES])
def test_each_route_takes_exactly_its_scope(client: tuple[Runtime, TestClient], scope: str, method: str, path: str,
                                            body: dict[str, Any] | None) -> None:
    _, c = client
    r = c.request(method, path, json=body, headers=bearer(OWNER[scope]))
    assert r.status_code not in (401, 403), r.text  # 404 for an unknown id is the route's own answer
    for other, key in OWNER.items():
        if other != scope:
            assert_scope_refused(c.request(method, path, json=body, headers=bearer(key)), scope)


@pytest.mark.parametrize("key", ["k-legacy", "k-plain"])
def test_an_entry_without_scopes_still_reaches_every_client_route(client: tuple[Runtime, TestClient],
                                                                   key: str) -> None:
    _, c = client
    for scope, method, path, body in ROUTES:
        r = c.request(method, path, json=body, headers=bearer(key))
        if scope == "operator":  # as before scopes: a client key never read /metrics
            assert_scope_refused(r, "operator")
        else:
            assert r.status_code not in (401, 403), (method, path, r.text)
    # and the old operator list still opens /metrics (and only the operator routes)
    assert c.get("/metrics", headers=bearer("k-op-legacy")).status_code == 200
    assert_scope_refused(c.get("/v1/datasets", headers=bearer("k-op-legacy")), "predict")


def test_no_key_is_401_and_an_unknown_key_403_as_before(client: tuple[Runtime, TestClient]) -> None:
    _, c = client
    for _, method, path, body in ROUTES:
        r = c.request(method, path, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", (path, r.text)
        r = c.request(method, path, json=body, headers=bearer("k-nobody"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    assert c.get("/healthz").status_code == 200  # no key: orchestrators send none
    assert c.get("/readyz").status_code in (200, 503)


def test_a_key_listed_twice_has_the_union_of_its_scopes() -> None:
    s = ApiSettings(api_keys=f"{_entry('k', 'predict')},{_entry('k', 'users')}", operator_keys="k")
    assert s.key_scopes() == {hashlib.sha256(b"k").hexdigest(): frozenset({"predict", "users", "operator"})}
    assert s.unscoped_key_count() == 0
    assert ApiSettings(api_keys=f"{_entry('a')},b,{_entry('c', 'users')}").unscoped_key_count() == 2


@pytest.mark.parametrize(("value", "index", "why"), [
    ("{ok},{bad}:predict+user", 2, "unknown scope 'user'"),
    ("{bad}:", 1, "empty scope"),
    ("{ok},,{bad}:predict++users", 3, "empty scope"),
    ("{ok},sha256:abc123", 2, "not sha256:<64 hex digits>"),
])
def test_a_malformed_entry_is_a_startup_error_naming_its_position_not_its_hash(value: str, index: int,
                                                                               why: str) -> None:
    ok, bad = _entry("ok-key"), _entry("secret-key")
    with pytest.raises(ValidationError) as e:
        ApiSettings(api_keys=value.format(ok=ok, bad=bad))
    text = str(e.value)
    assert f"SHOPLENS_API_KEYS entry {index} " in text and why in text, text
    if "scope" in why:
        assert "valid scopes: predict, events:write, users, operator" in text
    assert bad.split(":")[1] not in text and ok.split(":")[1] not in text and "abc123" not in text


def test_shoplens_serve_stops_before_serving_on_a_malformed_entry() -> None:
    bad = f"{_entry('ok-key')},{_entry('secret-key')}:predict+admin"
    r = CliRunner().invoke(cli_app, ["serve", "--no-ui"], env={"SHOPLENS_API_KEYS": bad, "COLUMNS": "300"})
    assert r.exit_code == 2, r.output
    assert "SHOPLENS_API_KEYS entry 2 has unknown scope 'admin'; valid scopes: predict" in " ".join(r.output.split())
    assert hashlib.sha256(b"secret-key").hexdigest() not in r.output


def test_a_plaintext_key_never_appears_in_a_settings_error() -> None:
    with pytest.raises(ValidationError) as e:
        ApiSettings(api_keys="plain-secret-key", operator_keys=f"{_entry('x')}:operator")
    assert "SHOPLENS_OPERATOR_KEYS entry 1" in str(e.value) and "plain-secret-key" not in str(e.value)


def test_the_startup_log_says_which_keys_have_every_client_scope(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    rt = Runtime(Settings(workspace=tmp_path, embedder="hashing-64"))
    api = ApiSettings(api_keys=f"{_entry('a')},{_entry('b', 'predict')},c", start_model=False, refresh_worker=False)
    with caplog.at_level(logging.INFO, logger="shoplens.api"), TestClient(create_app(rt, api)):
        pass
    (line,) = [r.getMessage() for r in caplog.records if "no scopes" in r.getMessage()]
    assert line.startswith("2 SHOPLENS_API_KEYS entries name no scopes and keep every client scope "
                           "(predict, events:write, users)"), line


def test_the_key_maker_prints_an_entry_with_the_scopes_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    keys_main(["--scope", "users", "--scope", "predict"])
    out = capsys.readouterr().out.splitlines()
    key = out[0].split()[-1]
    entry = out[1].split()[-1]
    assert entry == f"{_entry(key)}:predict+users"
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert ApiSettings(api_keys=entry).key_scopes() == {digest: frozenset({"predict", "users"})}
    key, entry = new_key()
    assert entry == _entry(key)  # no --scope: a bare entry, every client scope
    with pytest.raises(ValueError, match="valid scopes: predict, events:write, users, operator"):
        new_key(["admin"])
    assert set(SCOPES) == {"predict", "events:write", "users", "operator"}


# ---- the audit line -----------------------------------------------------------------------------


def _audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "shoplens.api.audit"]


def test_every_read_or_delete_of_a_users_data_leaves_one_audit_line(client: tuple[Runtime, TestClient],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    _, c = client
    pseudo = {u: pseudonymise(u, PSEUDO_KEY.encode()) for u in ("u1", "u2", "nobody")}
    kid = {k: hashlib.sha256(k.encode()).hexdigest()[:12] for k in ("k-users", "k-predict")}
    with caplog.at_level(logging.INFO, logger="shoplens.api"):
        c.get("/v1/users/u1/events", params={"dataset": DS}, headers=bearer("k-users"))
        c.delete("/v1/users/u2", params={"dataset": DS}, headers=bearer("k-users"))
        c.delete("/v1/users/nobody", params={"dataset": DS}, headers=bearer("k-users"))
        c.delete("/v1/users/u1", params={"dataset": DS}, headers=bearer("k-predict"))  # refused: no users scope
        c.get("/v1/users/u1/events", params={"dataset": DS})  # refused: no key
        c.post("/v1/churn", json={"dataset": DS, "user_id": "u1", "use_llm": False}, headers=bearer("k-predict"))
    got = [(a["action"], a["user_id"], a["key_id"], a["route"], a["status"]) for a in _audit(caplog)]
    assert got == [
        ("read", pseudo["u1"], kid["k-users"], "/v1/users/{user_id}/events", 200),
        ("delete", pseudo["u2"], kid["k-users"], "/v1/users/{user_id}", 200),
        ("delete", pseudo["nobody"], kid["k-users"], "/v1/users/{user_id}", 404),
        ("delete", pseudo["u1"], kid["k-predict"], "/v1/users/{user_id}", 403),
        ("read", pseudo["u1"], None, "/v1/users/{user_id}/events", 401),
    ]  # the churn prediction is not a read of stored data: no audit line
    for a in _audit(caplog):
        assert a["audit"] is True and a["dataset"] == DS and a["request_id"] and a["method"] in ("GET", "DELETE")
    # the caller's raw id is in no log line at all (the access line has the route, not the path)
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "/v1/users/u1" not in text and '"u1"' not in text and "k-users" not in text
