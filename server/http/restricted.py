"""`--http-restricted-api` as ASGI middleware: a request to an endpoint of a restricted group
without the header is answered 403 {"error": "This API is restricted, expecting header '...'"}
(Triton's answer) before the router or any endpoint sees it; its body is never read.

Wrapped around the app only when some group is restricted.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.restricted import Restrictions, http_group


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None


class RestrictedApi:
    def __init__(self, app: ASGIApp, restrictions: Restrictions) -> None:
        self.app = app
        self.restrictions = restrictions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            restriction = self.restrictions.get(http_group(scope["path"]))
            if restriction is not None and not restriction.allows(
                _header(scope, restriction.header.encode("latin-1"))
            ):
                body = orjson.dumps({"error": restriction.http_message()})
                await Response(body, 403, media_type="application/json")(scope, receive, send)
                return
        await self.app(scope, receive, send)
