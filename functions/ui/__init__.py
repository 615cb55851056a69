"""The portal: static HTML, CSS and ES modules under ``static/``, served at ``/ui`` by the control plane.

No build step and nothing from a CDN: the page talks to the same ``/v1`` API as the CLI, with the API key the
user signs in with (kept in the browser tab's sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount(app: FastAPI) -> None:
    """Serve the portal at /ui/ (and /ui redirects there)."""

    @app.get("/ui", include_in_schema=False)
    def portal() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")
