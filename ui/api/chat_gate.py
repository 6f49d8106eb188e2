"""The chat at /ui behind the API's keys: every request to the mount needs a key with the
`predict` scope, checked by the API's own `Authenticator`.

Gradio's own `auth_dependency` guards only the routes Gradio lists (its page, config, queue
join and data, uploads, files...), not all of them (heartbeat, cancel, reset, streams, run
history, assets: gradio 6.31 `routes.py`), so the gate sits in front of the whole mount as an
ASGI wrapper, and Gradio gets the gate's key id as its user (`gradio_user`).

A request is let in with either
* ``Authorization: Bearer <key>`` (scripts, the Gradio Python client), or
* the session cookie that the gate's sign-in page sets: a browser opening /ui is sent to
  /ui/login, a form where the merchandiser pastes a key. The cookie holds the key's hash, an
  expiry and an HMAC under a secret made at startup (never the key itself), is HttpOnly,
  SameSite=Lax and scoped to the mount's path; it is checked against the configured keys and
  their scopes on every request, so removing a key (and restarting) ends its sessions.
  /ui/logout clears it.

Anything else gets the API's error envelope (401 no key, 403 an unknown key or one without
`predict`); a browser's page load without a session is redirected to the sign-in page.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
import time
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from agent.app.runtime import Runtime
from ui.api.errors import ApiError, envelope
from ui.api.security import Authenticator

COOKIE = "shoplens_ui"
SCOPE = "predict"
# A signed-in browser stays signed in this long (seconds): one working day.
SESSION_S = 12 * 3600
# The sign-in form's body is one key; anything longer is not a key.
_MAX_FORM_BYTES = 4096


class ChatGate:
    """ASGI wrapper of a mounted app (the Gradio chat): lets in requests with a key that has
    the `predict` scope (bearer header or session cookie), answers the sign-in form, and refuses
    the rest. Sets ``request.state.key_id`` (the access log's and Gradio's user)."""

    def __init__(self, app: ASGIApp, auth: Authenticator, *, session_s: int = SESSION_S):
        self.app = app
        self.auth = auth
        self.session_s = session_s
        self._secret = secrets.token_bytes(32)  # per process: a restart signs every browser out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        sub = scope["path"][len(root):] if scope["path"].startswith(root) else scope["path"]
        if scope["type"] == "http" and sub.rstrip("/") in ("/login", "/logout"):
            resp = await self._login(scope, receive, root) if sub.rstrip("/") == "/login" else self._logout(root)
            await resp(scope, receive, send)
            return
        try:
            key_id = self._authorize(scope)
        except ApiError as e:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # policy violation
                return
            await self._refuse(e, scope, root)(scope, receive, send)
            return
        scope.setdefault("state", {})["key_id"] = key_id
        await self.app(scope, receive, send)

    # ---- checks -----------------------------------------------------------------------------

    def _authorize(self, scope: Scope) -> str:
        """The key id of the request's bearer key or session cookie (bearer first).

        Raises:
            ApiError: as `Authenticator.authorize` (401 no credentials, 403 unknown key or no
                `predict` scope, or an expired or forged session).
        """
        headers = _headers(scope)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return self.auth.authorize(token.strip(), [SCOPE])
        if self.auth.allow_anonymous:
            return "anonymous"
        cookie = _cookies(headers).get(COOKIE)
        if cookie is None:
            return self.auth.authorize(None, [SCOPE])  # raises: 401 (no key, or none configured)
        digest = self._verify(cookie)
        if digest is None or digest not in self.auth.scopes:
            raise ApiError(401, "the chat session has expired or its key was removed: sign in again at "
                           "the chat's /login page", code="session_expired", headers={"WWW-Authenticate": "Bearer"})
        return self.auth.check_scopes(digest, [SCOPE])

    def _sign(self, digest: str, expires: int) -> str:
        msg = f"{digest}.{expires}"
        return f"{msg}.{hmac.new(self._secret, msg.encode(), hashlib.sha256).hexdigest()}"

    def _verify(self, cookie: str) -> str | None:
        """The key hash in a session cookie this process signed and that has not expired."""
        digest, _, rest = cookie.partition(".")
        expires, _, _sig = rest.partition(".")
        if not expires.isdigit() or int(expires) < time.time():
            return None
        return digest if hmac.compare_digest(self._sign(digest, int(expires)), cookie) else None

    # ---- responses --------------------------------------------------------------------------

    async def _login(self, scope: Scope, receive: Receive, root: str) -> Response:
        """GET: the sign-in form. POST (form field ``key``): a session cookie and a redirect to
        the chat, or the form again with why the key was refused (401/403)."""
        if scope["method"] != "POST":
            return _page(root)
        body = await Request(scope, receive).body()
        key = parse_qs(body[:_MAX_FORM_BYTES].decode("utf-8", "replace")).get("key", [""])[0].strip()
        try:
            self.auth.authorize(key or None, [SCOPE])
        except ApiError as e:
            return _page(root, e.message, status=e.status)
        if self.auth.allow_anonymous:
            return RedirectResponse(f"{root}/", status_code=303)
        digest = self.auth.identify(key)
        resp = RedirectResponse(f"{root}/", status_code=303)
        resp.set_cookie(COOKIE, self._sign(digest, int(time.time()) + self.session_s), max_age=self.session_s,
                        path=root or "/", httponly=True, samesite="lax", secure=scope.get("scheme") == "https")
        return resp

    def _logout(self, root: str) -> Response:
        resp = RedirectResponse(f"{root}/login", status_code=303)
        resp.delete_cookie(COOKIE, path=root or "/")
        return resp

    def _refuse(self, e: ApiError, scope: Scope, root: str) -> Response:
        """A browser's page load goes to the sign-in form; anything else gets the envelope."""
        accept = _headers(scope).get("accept", "")
        if scope["method"] == "GET" and "text/html" in accept and e.status == 401:
            return RedirectResponse(f"{root}/login", status_code=303)
        return envelope(e.status, e.message, code=e.code, param=e.param, type_=e.type, headers=e.headers)


def mount_gated_chat(app: FastAPI, runtime: Runtime, path: str = "/ui", **kwargs: Any) -> FastAPI:
    """Mount the merchandiser chat (`ui.chat.mount_chat`, the ``ui`` extra) at `path` of an API
    app, behind the app's keys (scope `predict`); what ``shoplens serve`` does. `kwargs` go to
    `ui.chat.build_chat_app`.

    Raises:
        ValueError: `app` is not from `ui.api.create_app`.
    """
    from ui.chat import mount_chat  # gradio, imported on use

    api = getattr(app.state, "api", None)
    if api is not None:  # each turn counted in the API's /metrics (shoplens_chat_*)
        kwargs.setdefault("on_turn", api.metrics.chat_turn)
    app = mount_chat(app, runtime, path, auth_dependency=gradio_user, **kwargs)
    gate_chat(app, path)
    return app


def gate_chat(app: FastAPI, path: str = "/ui") -> None:
    """Put the mount at `path` (the chat, see `ui.chat.mount_chat`) behind the app's keys.

    Raises:
        ValueError: `app` has nothing mounted at `path`, or is not a ShopLens API app.
    """
    auth: Authenticator | None = getattr(getattr(app.state, "api", None), "auth", None)
    if auth is None:
        raise ValueError("gate_chat needs the app from ui.api.create_app (its keys)")
    for route in app.router.routes:
        if isinstance(route, Mount) and route.path == path.rstrip("/"):
            route.app = ChatGate(route.app, auth)
            return
    raise ValueError(f"nothing is mounted at {path}")


def gradio_user(request: Request) -> str | None:
    """Gradio's ``auth_dependency``: the key id the gate set, so Gradio's own checks agree with
    the gate's (and refuse if the gate is ever missing)."""
    key_id: str | None = getattr(request.state, "key_id", None)
    return key_id


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header is no session, not a 500
        return {}
    return {k: m.value for k, m in jar.items()}


def _page(root: str, message: str | None = None, *, status: int = 200) -> HTMLResponse:
    """The sign-in form: one password field for the key, no scripts, no external assets."""
    note = f'<p class="err">{html.escape(message)}</p>' if message else ""
    action = html.escape(f"{root}/login", quote=True)
    return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ShopLens chat: sign in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}}
input{{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}}button{{margin-top:1rem;padding:.5rem 1.5rem}}
.err{{color:#b00020}}</style></head>
<body><h1>ShopLens chat</h1>
<p>Sign in with your ShopLens API key (it needs the <code>predict</code> scope; ask the operator for one).</p>
{note}<form method="post" action="{action}">
<label for="key">API key</label><input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button></form></body></html>""", status_code=status,
                        headers={"Cache-Control": "no-store"})


__all__ = ["COOKIE", "ChatGate", "gate_chat", "gradio_user", "mount_gated_chat"]
