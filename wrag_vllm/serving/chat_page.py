"""The WRAG chat page: a static HTML/CSS/JS app served by the WRAG server itself.

Routes (added to vLLM's API server next to the admin routes of admin.py):
    GET /wrag/chat                    the page (chat.html)
    GET /wrag/chat/static/{name}      its CSS/JS, read from the installed package (importlib.resources)

The page holds no secret and talks only to routes of the same server (/v1/chat/completions with
streaming, /wrag/shards, /wrag/retrieve, /wrag/config), sending the API key the user types in as
`Authorization: Bearer`; those routes do the authentication (as does /wrag/chat/methods, in
admin.py). The page's own files are the same static files for everyone, public like /health.
No build step and no CDN: the files in wrag_vllm/static/ are what the browser gets.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

# Only these files are served (no path from the URL ever reaches the file system).
STATIC_FILES = {
    "chat.html": "text/html; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
}
# Same-origin only: the page loads nothing from elsewhere and runs no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_static(name: str) -> bytes:
    """Bytes of one page file from the installed package; KeyError for a name not in STATIC_FILES."""
    if name not in STATIC_FILES:
        raise KeyError(name)
    return resources.files("wrag_vllm").joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    try:
        body = read_static(name)
    except (KeyError, FileNotFoundError):
        raise HTTPException(status_code=404, detail=f"no such page file: {name}") from None
    return Response(content=body, media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)


def chat_router() -> APIRouter:
    router = APIRouter()

    @router.get("/wrag/chat", include_in_schema=False)
    async def chat_page():
        return _file("chat.html")

    @router.get("/wrag/chat/", include_in_schema=False)
    async def chat_page_slash():
        # the page's relative URLs assume /wrag/chat without the slash
        return RedirectResponse("../chat", status_code=307)

    @router.get("/wrag/chat/static/{name}", include_in_schema=False)
    async def chat_static(name: str):
        return _file(name)

    return router
