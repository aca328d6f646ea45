"""The page shell: ``/`` and its assets under ``/ui/``, with the page's security headers.

The shell and its assets are the same for everyone and hold no study data, so they are served
ahead of API-key authentication (the page then asks the reader for a key and sends it as a
bearer token on every ``/v1`` call, which stay behind the key). Only these responses carry the
page's Content-Security-Policy: no inline script or style, nothing from another origin.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

STATIC = Path(__file__).parent / "static"
ASSET_PREFIX = "/ui/"
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",  # previews and heatmaps are fetched with the key, shown as blobs
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
    "cache-control": "no-cache",  # revalidate (ETag): a new release shows at the next load
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(folder: Path = STATIC) -> dict[str, Asset]:
    """Every file of ``folder`` by URL path: ``index.html`` at ``/``, the others under ``/ui/``.
    Read once: the page is part of the installed package and changes only with it."""
    assets = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        body = path.read_bytes()
        url = "/" if path.name == "index.html" else ASSET_PREFIX + path.name
        media_type = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        assets[url] = Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    if "/" not in assets:
        raise FileNotFoundError(f"{folder}/index.html is missing; reinstall the package")
    return assets


def is_page_path(path: str) -> bool:
    return path == "/" or path.startswith(ASSET_PREFIX)


class PageMiddleware:
    """Answers ``GET /`` and ``GET /ui/…`` from the packaged assets; passes everything else on."""

    def __init__(self, app: ASGIApp, assets: dict[str, Asset]) -> None:
        self.app = app
        self.assets = assets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_page_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        asset = self.assets.get(scope["path"])
        if scope["method"] not in ("GET", "HEAD"):
            await _send(
                send, 405, _error("method_not_allowed", "the page is read with GET"), "application/json"
            )
        elif asset is None:
            await _send(send, 404, _error("not_found", "no such page asset"), "application/json")
        elif asset.etag.encode() in _if_none_match(scope):
            await _send(send, 304, b"", None, asset.etag)
        else:
            body = b"" if scope["method"] == "HEAD" else asset.body
            await _send(send, 200, body, asset.media_type, asset.etag, len(asset.body))


def _if_none_match(scope: Scope) -> list[bytes]:
    raw = dict(scope["headers"]).get(b"if-none-match", b"")
    return [tag.strip() for tag in raw.split(b",")]


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def _send(
    send: Send,
    status: int,
    body: bytes,
    media_type: str | None,
    etag: str | None = None,
    length: int | None = None,
) -> None:
    headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    if media_type:
        headers.append((b"content-type", media_type.encode()))
    if etag:
        headers.append((b"etag", etag.encode()))
    if status != 304:
        headers.append((b"content-length", str(len(body) if length is None else length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
