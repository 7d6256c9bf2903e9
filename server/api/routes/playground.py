"""The playground: `GET /` is a page that lists the tasks and tries them side
by side in a browser. Its files (server/playground/) ship in the package and
are served from it: no CDN, no build step. Every answer carries a strict
Content-Security-Policy: the page runs its own script file and nothing else
(no inline script, no eval), and talks only to this server."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ptcore.errors import NotFound

FILES = Path(__file__).resolve().parents[2] / "playground"
# what /ui/ serves, and nothing else
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "icon.svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}  # fmt: skip

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page():
    return FileResponse(FILES / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/ui/{name}")
async def asset(name: str):
    if name not in ASSETS:
        raise NotFound(f"no playground file {name!r}")
    return FileResponse(FILES / name, media_type=ASSETS[name], headers=HEADERS)
