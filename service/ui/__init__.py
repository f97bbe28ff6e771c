"""The read-only web UI (``/ui``): Jinja2 pages over the API's use cases, no build step."""

from starlette.staticfiles import StaticFiles

from service.ui.routes import STATIC_DIR, router

__all__ = ["router", "static_files"]


def static_files() -> StaticFiles:
    """The stylesheet and the little script, served from the package (no CDN)."""
    return StaticFiles(directory=STATIC_DIR)
