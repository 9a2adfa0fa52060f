"""Serves the operator console at `/console`: its page, script and style, and the front-end
libraries it uses, installed from npm (`npm ci` into `node_modules/` beside this file).

The console holds no data and no key: the page asks for an API key and calls the public API
with it, like any client, so these routes need no authorization.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from magasin.config import Settings

log = logging.getLogger("magasin.console")

HERE = Path(__file__).parent
STATIC = HERE / "static"
OWN = {"console.js": "text/javascript", "console.css": "text/css"}
"""Our own files under static/ (index.html is the page itself)."""
VENDOR = {
    "alpine.js": ("alpinejs/dist/cdn.min.js", "text/javascript"),
    "uplot.js": ("uplot/dist/uPlot.iife.min.js", "text/javascript"),
    "uplot.css": ("uplot/dist/uPlot.min.css", "text/css"),
    "pico.css": ("@picocss/pico/css/pico.min.css", "text/css"),
}
"""The library files the page loads, by the name it loads them under. Only these are
served: node_modules/ as a whole stays private."""
CACHE = {"Cache-Control": "no-cache"}  # revalidated (ETag) so an upgrade shows at once

MISSING = """<!doctype html><html lang="en"><meta charset="utf-8">
<title>magasin console: not installed</title>
<body style="font-family: sans-serif; max-width: 40rem; margin: 3rem auto">
<h1>The console's libraries are not installed</h1>
<p>Missing: {missing}. Run <code>make install</code> (it runs <code>npm ci</code> in
<code>src/magasin/console/</code>), or set <code>MAGASIN_CONSOLE_MODULES</code> to a
<code>node_modules</code> folder holding them, then reload this page.</p>
<p>The API itself works: see <a href="/docs">/docs</a>.</p></body></html>"""


def modules_dir() -> Path:
    """Where the npm packages are: MAGASIN_CONSOLE_MODULES, else node_modules/ here."""
    return Path(os.environ.get("MAGASIN_CONSOLE_MODULES") or HERE / "node_modules")


def missing_modules(modules: Path | None = None) -> list[str]:
    """The library files the page needs that are not installed."""
    base = modules or modules_dir()
    return [path for path, _ in VENDOR.values() if not (base / path).is_file()]


def router(settings: Settings) -> APIRouter:
    api = APIRouter(tags=["console"], include_in_schema=False)
    modules = modules_dir()
    if missing := missing_modules(modules):
        log.warning("console libraries missing in %s (%s): run `make install`",
                    modules, ", ".join(missing))

    @api.get("/console")
    async def console_root() -> RedirectResponse:
        # Relative URLs of the page (static/..., vendor/...) resolve under /console/.
        return RedirectResponse("/console/", status_code=308)

    @api.get("/console/", response_model=None)
    async def console_page() -> FileResponse | HTMLResponse:
        if gaps := missing_modules(modules):
            return HTMLResponse(MISSING.format(missing=", ".join(gaps)), status_code=503)
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=CACHE)

    @api.get("/console/config.json")
    async def console_config() -> JSONResponse:
        """How this deployment wants the console to link outside (no data, no secret)."""
        return JSONResponse({"trace_url": settings.trace_url or None}, headers=CACHE)

    @api.get("/console/static/{name}")
    async def console_file(name: str) -> FileResponse:
        if name not in OWN:
            raise HTTPException(404, f"no console file {name!r}")
        return FileResponse(STATIC / name, media_type=OWN[name], headers=CACHE)

    @api.get("/console/vendor/{name}")
    async def console_library(name: str) -> FileResponse:
        if name not in VENDOR:
            raise HTTPException(404, f"no console library {name!r}")
        path, media_type = VENDOR[name]
        if not (modules / path).is_file():
            raise HTTPException(404, f"console library {name!r} is not installed: "
                                     "run `make install`")
        return FileResponse(modules / path, media_type=media_type, headers=CACHE)

    return api
