"""GET / : the offline web page (static/index.html; its script and style are local files, no CDN), served with a
strict Content-Security-Policy, as is everything under /static (PageFiles)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# The page runs only its own script and style files (no inline code: index.html has none, keep it so), shows
# images from the service and from blob: URLs of the user's own file, and may not be framed (clickjacking: a
# hostile page overlaying the upload button). Not for /docs and /redoc: Swagger UI needs an inline script.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class PageFiles(StaticFiles):
    """StaticFiles whose every answer (files, 304s, 404s) carries the page's security headers."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response
