"""API-key / bearer-token authentication for every route but the probes (pure ASGI middleware,
so it also guards the routes LitServe registers itself)."""

import hmac
import json
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from cxr_triage.observability import metrics

OPEN_PATHS = frozenset({"/health", "/ready"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        metrics.ERRORS.labels("unauthorized").inc()
        message = "send Authorization: Bearer <key> or X-API-Key: <key>"
        body = json.dumps({"error": {"code": "unauthorized", "message": message}}).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        # compare_digest against every key: the time taken does not say which key nearly matched
        return bool(given) and any([hmac.compare_digest(given, key) for key in self.keys])
