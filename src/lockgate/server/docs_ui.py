"""`/docs` (Swagger UI) that works offline: its script, stylesheet and icon are served from the
`fastapi-offline` wheel's copy of swagger-ui-dist under `/docs-assets/`, never from a CDN.

Only the files named in `ASSETS` are served (a name is looked up, never joined to a path, so no
request can reach another file); they are the same public files for every install, so the guard
lets them through without a key (middleware.py). ReDoc stays off: one documentation page.
"""
from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from lockgate.server.errors import APIError

DOCS_PATH = "/docs"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
ASSETS_PREFIX = "/docs-assets/"
# name -> media type: every file /docs-assets/ serves.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
_PACKAGE = "fastapi_offline"  # pinned in pyproject.toml; ships swagger-ui-dist 5 (OpenAPI 3.1)
_CACHE_CONTROL = "public, max-age=86400"


@cache
def asset_bytes(name: str) -> bytes:
    """One of `ASSETS`, read from the package once (about 1.7 MB in all)."""
    return (files(_PACKAGE) / "static" / name).read_bytes()


def install_docs(app: FastAPI) -> None:
    """The routes FastAPI's `docs_url` would add, pointing at the local assets (create the app with
    `docs_url=None, redoc_url=None`)."""

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PREFIX}swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PREFIX}swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PREFIX}favicon.png",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}")

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(ASSETS_PREFIX + "{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise APIError(404, f"no documentation asset {name[:64]!r}", code="not_found")
        return Response(asset_bytes(name), media_type=media_type,
                        headers={"cache-control": _CACHE_CONTROL, "x-content-type-options": "nosniff"})
