"""The FastAPI app: `create_app(runtime, settings)` builds it from routers. Nothing runs at import.

The routes (ui/api/routes/) validate, call the one service facade (`agent.app.service`), and
render; errors map onto the one envelope in `ui/api/errors.py`. The lifespan starts the model and
loads every dataset's indexes in the background, so the server answers (degraded) while they load,
and runs the refresh worker that recomputes precomputed answers whose users got new events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from agent.app.precompute import RefreshWorker
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from ui.api.config import CLIENT_SCOPES, SCOPES, ApiSettings
from ui.api.deps import ApiContext
from ui.api.errors import install_error_handlers
from ui.api.metrics import Metrics
from ui.api.middleware import ApiMiddleware
from ui.api.model import MetricsObserver
from ui.api.routes import ROUTERS
from ui.api.security import Authenticator, RateLimiter

log = logging.getLogger("shoplens.api")


def create_app(runtime: Runtime, settings: ApiSettings | None = None) -> FastAPI:
    """The ShopLens HTTP API over one `Runtime` (which the app closes at shutdown)."""
    settings = settings or ApiSettings()
    metrics = Metrics()
    runtime.add_observer(MetricsObserver(metrics))  # every guarded call, the chat's at /ui included
    holder = runtime.background_model(start=settings.start_model, retry_after_s=settings.retry_after_s,
                                      probe_cache_s=settings.readyz_cache_s, probe_timeout_s=settings.readyz_timeout_s)
    metrics.model_restarts.set_function(lambda: holder.restarts)
    ctx = ApiContext(
        runtime=runtime, settings=settings, metrics=metrics, auth=Authenticator(settings),
        limiter=RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst), holder=holder,
        service=ShopLensService(runtime, model_provider=holder.get, min_retry_after_s=settings.retry_after_s),
    )

    # The refresh worker computes with the same runtime (indexes, model guard and lanes) and model
    # holder as the routes; its model calls go in the batch lane, behind every request's.
    worker = RefreshWorker(ShopLensService(runtime, model_provider=holder.get), poll_s=settings.refresh_poll_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The event store opens before serving: pending schema migrations run here, once, and a
        # wrong SHOPLENS_DATABASE_URL or an unreachable database stops startup with its message.
        store = await asyncio.to_thread(lambda: runtime.store)
        log.info("event store: %s", store.location)  # the password masked
        if not ctx.auth.hashes and not ctx.auth.allow_anonymous:
            log.warning("no API keys configured: every protected route answers 401 (set SHOPLENS_API_KEYS)")
        if unscoped := settings.unscoped_key_count():
            one = unscoped == 1
            log.info("%d SHOPLENS_API_KEYS %s no scopes and %s every client scope (%s), as before scopes "
                     "existed; append :scope+scope to an entry to narrow it (docs/api.md#scopes)", unscoped,
                     "entry names" if one else "entries name", "keeps" if one else "keep",
                     ", ".join(s for s in SCOPES if s in CLIENT_SCOPES))
        holder.start()
        warm = asyncio.create_task(ctx.service.warm_up(), name="shoplens-warm-indexes")
        if settings.refresh_worker:
            worker.start()
        try:
            yield
        finally:
            warm.cancel()
            await worker.stop()  # a refresh in flight stays queued for the next start
            await ctx.service.progressive.aclose()  # running refinements end with the model
            await holder.aclose()
            await runtime.aclose()

    app = FastAPI(
        title="ShopLens API",
        version="1",
        summary="Behaviour sequences in, validated and explained e-commerce predictions out.",
        lifespan=lifespan,
        docs_url="/docs" if settings.public_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.public_docs else None,
    )
    app.state.api = ctx
    app.state.refresh_worker = worker
    install_error_handlers(app)
    app.add_middleware(ApiMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    for router in ROUTERS:
        app.include_router(router)
    return app
