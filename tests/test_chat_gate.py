"""The chat at /ui behind the API's keys (scope `predict`), as `shoplens serve` mounts it: every
path under /ui, Gradio's API, queue and SSE endpoints included, refuses a request without a
valid key; a bearer key or the sign-in page's session cookie lets the chat page load. Over
HTTP in-process (TestClient); no browser."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response

pytest.importorskip("gradio", reason="the ui extra is not installed: pip install -e '.[ui]'")

from agent.app.runtime import Runtime  # noqa: E402
from agent.settings import Settings  # noqa: E402
from ui.api import ApiSettings, create_app  # noqa: E402
from ui.api.chat_gate import COOKIE, mount_gated_chat  # noqa: E402

PREDICT, USERS = "k-predict", "k-users"
HTML = {"Accept": "text/html,application/xhtml+xml"}
# Gradio's own page, config, API info, queue (join, SSE data), heartbeat (SSE), cancel, reset,
# upload, file, user and run-history routes and its theme: none may answer without a key (several
# of them Gradio itself leaves open even with auth_dependency).
GRADIO_PATHS = [
    ("GET", "/ui/"), ("GET", "/ui/config"), ("GET", "/ui/gradio_api/info"),
    ("POST", "/ui/gradio_api/queue/join"), ("GET", "/ui/gradio_api/queue/data?session_hash=abc"),
    ("GET", "/ui/gradio_api/heartbeat/abc"), ("POST", "/ui/gradio_api/cancel"), ("POST", "/ui/gradio_api/upload"),
    ("GET", "/ui/gradio_api/file=/etc/hostname"), ("GET", "/ui/theme.css"), ("GET", "/ui/gradio_api/startup-events"),
    ("POST", "/ui/gradio_api/reset"), ("GET", "/ui/gradio_api/user"), ("GET", "/ui/gradio_api/run-history/records"),
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _entry(key: str, scope: str) -> str:
    return f"sha256:{hashlib.sha256(key.encode()).hexdigest()}:{scope}"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    rt = Runtime(Settings(workspace=tmp_path, embedder="hashing-64"))
    api = ApiSettings(api_keys=f"{_entry(PREDICT, 'predict')},{_entry(USERS, 'users')}", rate_limit_rps=0,
                      start_model=False, refresh_worker=False)
    app = mount_gated_chat(create_app(rt, api), rt, path="/ui", use_model=False)
    with TestClient(app, follow_redirects=False) as c:
        yield c


def _is_chat_page(r: Response) -> bool:
    """Gradio's page with the chat's config inlined (its heading among the components)."""
    return r.status_code == 200 and "<gradio-app" in r.text and "ask about customers, products and segments" in r.text


@pytest.mark.parametrize(("method", "path"), GRADIO_PATHS)
def test_every_chat_path_refuses_a_request_without_a_valid_predict_key(client: TestClient, method: str,
                                                                       path: str) -> None:
    r = client.request(method, path)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
    r = client.request(method, path, headers=bearer("k-nobody"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_api_key", r.text
    r = client.request(method, path, headers=bearer(USERS))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text
    assert "`predict` scope" in r.json()["error"]["message"]


def test_a_browser_without_a_session_gets_the_sign_in_page_not_the_chat(client: TestClient) -> None:
    r = client.get("/ui/", headers=HTML)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    page = client.get("/ui/login")
    assert page.status_code == 200 and 'type="password"' in page.text and 'action="/ui/login"' in page.text
    assert "<title>ShopLens chat: sign in</title>" in page.text and not _is_chat_page(page)


def test_a_bearer_key_with_predict_loads_the_chat(client: TestClient) -> None:
    r = client.get("/ui/", headers=bearer(PREDICT))
    assert _is_chat_page(r), r.text[:500]
    config = client.get("/ui/config", headers=bearer(PREDICT))
    assert config.status_code == 200 and config.json()["username"] == hashlib.sha256(PREDICT.encode()).hexdigest()[:12]


def test_signing_in_with_a_key_sets_a_session_that_loads_the_chat_until_sign_out(client: TestClient) -> None:
    wrong = client.post("/ui/login", data={"key": USERS})
    assert wrong.status_code == 403 and "`predict` scope" in wrong.text and COOKIE not in wrong.cookies
    assert client.post("/ui/login", data={"key": "k-nobody"}).status_code == 403
    r = client.post("/ui/login", data={"key": PREDICT})
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = r.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower() and "Path=/ui" in cookie
    assert PREDICT not in cookie  # the cookie holds a signed hash, never the key
    assert _is_chat_page(client.get("/ui/", headers=HTML))
    assert client.get("/ui/config").status_code == 200
    assert client.get("/ui/gradio_api/info").status_code == 200

    client.get("/ui/logout")
    assert client.get("/ui/", headers=HTML).status_code == 303  # back to the sign-in page


def test_a_forged_or_foreign_session_cookie_is_refused(client: TestClient) -> None:
    client.post("/ui/login", data={"key": PREDICT})
    good = client.cookies[COOKIE]
    digest, expires, sig = good.split(".")
    client.cookies.clear()
    users_digest = hashlib.sha256(USERS.encode()).hexdigest()
    for forged in (f"{users_digest}.{expires}.{sig}", f"{digest}.{int(expires) + 999}.{sig}", f"{digest}.1.{sig}",
                   "garbage"):
        client.cookies.set(COOKIE, forged, path="/ui")
        r = client.get("/ui/config")
        assert r.status_code == 401 and r.json()["error"]["code"] == "session_expired", (forged, r.text)
