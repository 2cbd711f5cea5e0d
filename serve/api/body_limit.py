"""Refuse request bodies over a byte limit before anything parses them (HTTP 413).

The prompt-length limit is checked after JSON parsing; without this, a client could still make
the server read and parse an arbitrarily large body first. Routes that take an image
(`input_reference`) get a larger limit of their own (`route_limits`); every other body stays at
`max_bytes`.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.api.errors import error_body

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a request is a prompt and a few numbers


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, route_limits: dict[tuple[str, str], int] | None = None
    ) -> None:
        """`route_limits`: (method, path) -> byte limit of that route instead of `max_bytes`."""
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = route_limits or {}

    def limit_for(self, scope: Scope) -> int:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # behind a mount or --root-path: match the app's own path
            path = path[len(root) :]
        return self.route_limits.get((scope["method"], path), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, send, limit)
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # chunked bodies declare no length: count as they arrive
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted_receive, send)
        except BodyTooLarge:
            await self._refuse(scope, send, limit)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        # In the error shape of the API the path belongs to, as every other refusal (serve.api.errors).
        message = f"request body over {limit} bytes"
        body = json.dumps(error_body(scope["path"], 413, message, code="request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
