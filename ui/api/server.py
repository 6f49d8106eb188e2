"""Run the API with uvicorn (what `shoplens serve` calls)."""

from __future__ import annotations

from agent.app.runtime import Runtime
from agent.settings import Settings
from ui.api.config import ApiSettings
from ui.api.middleware import configure_logging


def serve(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None,
          api_settings: ApiSettings | None = None, *, with_ui: bool = True) -> None:
    """Serve the API until interrupted (SIGINT/SIGTERM shut it down cleanly, model included).

    Args:
        host: bind address; 127.0.0.1 by default (put a TLS-terminating proxy in front to
            expose it).
        port: TCP port.
        settings: the agent's settings (workspace, model, embedder); default `Settings()`.
        api_settings: the HTTP layer's settings (keys, limits); default from SHOPLENS_* env.
        with_ui: mount the merchandiser chat (Gradio) at /ui beside the API, sharing the runtime,
            behind the API's keys (scope `predict`; a browser signs in at /ui/login).

    Raises:
        pydantic.ValidationError: a malformed SHOPLENS_* setting, e.g. a key entry with an
            unknown scope (named by its position, never its text).
    """
    import uvicorn  # the `api` extra; imported here so the package imports without it

    api = api_settings or ApiSettings()
    configure_logging(api.log_level)
    from ui.api.app import create_app

    runtime = Runtime(settings or Settings())
    app = create_app(runtime, api)
    if with_ui:
        from ui.api.chat_gate import mount_gated_chat  # the `ui` extra (gradio)

        app = mount_gated_chat(app, runtime, path="/ui")
    # One worker: the runtime (SQLite writer, FAISS indexes, model server) lives in-process.
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)
