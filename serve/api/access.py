"""Who may call the API, and how long a connection may sit idle.

- `ApiKeyMiddleware`: with keys configured, every route but the probes (`/health`, `/ready`)
  and the playground page's own files (`serve.api.playground.PAGE_PATHS`: static, no data)
  needs `Authorization: Bearer KEY`; the key is compared in constant time with every configured
  key (no early exit, so timing tells nothing about which key or how much of it matched). The
  caller's tenant (a hash of its key, never the key) goes into the request's state: jobs carry
  it, and a caller sees and deletes only its own.
- `body_timeout`: a client that stops sending its body is treated as gone.
- `HeaderTimeoutProtocol`: uvicorn's h11 protocol, plus a deadline for a request's headers (a
  slowloris connection that trickles header bytes is closed, not held forever; uvicorn's own
  keep-alive timeout covers only the idle time between requests).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.api.playground import PAGE_PATHS

PROBES = frozenset({"/health", "/ready"})  # a load balancer's health checks carry no key
DOCS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def tenant_of(key: str) -> str:
    """A caller's identity in job records: a hash of its key (records never hold the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def matching_key(token: str, keys: tuple[str, ...]) -> str | None:
    """The configured key equal to `token`, compared in constant time against every key."""
    found = None
    for key in keys:
        if hmac.compare_digest(token.encode(), key.encode()):
            found = key
    return found


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...], open_docs: bool = False, body_timeout_s: float = 60.0):
        self.app = app
        self.keys = keys
        # The page must load without a key: the user types it there, and the page sends it.
        self.open_paths = PROBES | PAGE_PATHS | (DOCS if open_docs else frozenset())
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        receive = body_timeout(receive, self.body_timeout_s)
        state = scope.setdefault("state", {})
        state["tenant"] = None
        if self.keys and scope["path"] not in self.open_paths:
            key = matching_key(_bearer(scope), self.keys)
            if key is None:
                await _unauthorized(scope, send)
                return
            state["tenant"] = tenant_of(key)
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


async def _unauthorized(scope: Scope, send: Send) -> None:
    message = "missing or invalid API key: send `Authorization: Bearer KEY`"
    if scope["path"].startswith("/v1/"):
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
        body = {"error": error}
    else:
        body: dict = {"detail": message, "type": "unauthorized"}
    headers = [(b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="reelserve"')]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def body_timeout(receive: Receive, timeout_s: float) -> Receive:
    """`receive`, except that a body part that does not arrive within `timeout_s` reads as the
    client's disconnect (the request is dropped as if it had gone). Only while the body is being
    read: afterwards `receive` waits for the disconnect of a client that is still listening (a
    `POST /generate` may run for many minutes), and that wait has no deadline."""
    body_read = False

    async def receive_within() -> Message:
        nonlocal body_read
        if body_read:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except TimeoutError:
            return {"type": "http.disconnect"}
        body_read = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_within


class HeaderTimeoutProtocol(H11Protocol):
    """h11 with a deadline for each request's headers (`header_timeout_s` on the config, set by
    `with_header_timeout`). Armed when a connection opens and when data for a new request starts
    arriving; disarmed once h11 has the whole request head."""

    header_timeout_s = 30.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting_for_head = self.conn.their_state is h11.IDLE
        if waiting_for_head and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)
        elif not waiting_for_head:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
        self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for uvicorn's `http=` setting, with this server's header deadline."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": timeout_s})
