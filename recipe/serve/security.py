"""Who may do what, and how big a request may be.

- The edits API needs ``Authorization: Bearer <admin token>``.
- The completion API needs ``Authorization: Bearer <api key>`` when the server has one (the admin
  token is accepted there too); without one it is open (the server binds to loopback by default).
- Bodies larger than ``max_body_bytes`` are refused with 413 before they are read in full.
Tokens are compared in constant time.
"""
from __future__ import annotations

import json
import secrets

from fastapi import HTTPException, Request


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, *allowed: str | None) -> bool:
    return token is not None and any(a is not None and secrets.compare_digest(token.encode(), a.encode())
                                     for a in allowed)


def _refuse(message: str) -> HTTPException:
    return HTTPException(401, {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"},
                         headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: Request) -> None:
    """Dependency of the edits API."""
    if not _matches(_bearer(request), request.app.state.admin_token):
        raise _refuse("the edits API needs 'Authorization: Bearer <admin token>' (recipe serve --admin-token)")


def require_api_key(request: Request) -> None:
    """Dependency of the completion API: open unless the server has an API key."""
    key = request.app.state.api_key
    if key is not None and not _matches(_bearer(request), key, request.app.state.admin_token):
        raise _refuse("this server needs 'Authorization: Bearer <api key>'")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length, or counted as it streams)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._too_large(send)

    async def _too_large(self, send) -> None:
        body = json.dumps({"error": {"message": f"request body is larger than {self.max_bytes} bytes",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
