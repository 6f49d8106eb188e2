"""The API's routers, one module per area; `ui.api.app.create_app` includes them all."""

from ui.api.routes import datasets, events, feedback, next_item, ops, tasks

ROUTERS = [ops.router, next_item.router, tasks.router, events.router, datasets.router, feedback.router]

__all__ = ["ROUTERS"]
