"""ShopLens's JSON API: `create_app(runtime, settings)` and `serve(host, port, settings)`.

Importing this package builds nothing; the app and its dependencies are made when called.
"""

from __future__ import annotations

from ui.api.app import create_app
from ui.api.config import ApiSettings
from ui.api.server import serve

__all__ = ["ApiSettings", "create_app", "serve"]
