"""The merchandiser chat UI (Gradio). Thin: it calls `agent.chat.router.ChatAgent` and renders.

Entry points for the CLI: `build_chat_app(runtime)` (a `gr.Blocks`), `mount_chat(fastapi_app,
runtime, path="/ui")` for ``shoplens serve`` (which puts the mount behind the API's keys, scope
`predict`: `ui.api.chat_gate`) and `launch(host, port, settings)` for ``shoplens ui``. Gradio is imported on first use (the ``ui`` extra), never at package import.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from agent.app.runtime import Runtime
    from agent.settings import Settings


def build_chat_app(runtime: Runtime, **kwargs: Any) -> gr.Blocks:
    """See `ui.chat.app.build_chat_app`."""
    from ui.chat.app import build_chat_app as build

    return build(runtime, **kwargs)


def mount_chat(fastapi_app: Any, runtime: Runtime, path: str = "/ui", **kwargs: Any) -> Any:
    """See `ui.chat.app.mount_chat`."""
    from ui.chat.app import mount_chat as mount

    return mount(fastapi_app, runtime, path, **kwargs)


def launch(host: str = "127.0.0.1", port: int = 7860, settings: Settings | None = None, *,
           block: bool = True, use_model: bool = True) -> gr.Blocks:
    """Serve the chat alone (``shoplens ui``).

    Builds the `Runtime` from `settings` (default: `load_settings()`), warms the default
    dataset's indexes, and serves on host:port. With ``block=False`` it returns once the server
    is up (tests); the model server starts on the first question.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from agent.app.runtime import Runtime
    from agent.settings import load_settings

    rt = Runtime(settings or load_settings())
    for ds in rt.store.datasets()[:1]:
        rt.artifacts("online-retail" if "online-retail" in rt.store.datasets() else ds)
    app = build_chat_app(rt, use_model=use_model)
    app.queue(default_concurrency_limit=2).launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
        inbrowser=False, share=False,
    )
    return app
