"""Run the real app with uvicorn on a free loopback port in a background thread.

For tests and the load script: real HTTP, real middleware, real lifespan.

    with live_server(create_app(runtime, api_settings)) as base_url:
        httpx.get(base_url + "/healthz")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI

from agent.llm.servers.process import free_port

__all__ = ["free_port", "live_server"]


@contextmanager
def live_server(app: FastAPI, *, port: int | None = None, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 until the block exits; yields the base URL.

    Raises:
        RuntimeError: the server did not start within `startup_timeout_s` seconds.
    """
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
