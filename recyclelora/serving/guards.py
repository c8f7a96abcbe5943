"""ASGI guards in front of every route: the API key, and the request-body limits.

Both answer with the JSON error shape of the endpoints (``{"error": "..."}``), before or instead
of the application's own response, so a route never sees a request that broke them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")  # probes and scrapers carry no key


async def send_error(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


class BearerAuth:
    """401 unless ``Authorization: Bearer <key>`` matches (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str, open_paths: tuple[str, ...] = OPEN_PATHS) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in self.open_paths:
            return await self.app(scope, receive, send)
        given = _header(scope, b"authorization") or b""
        if not hmac.compare_digest(given, self.expected):
            what = "wrong" if given else "missing"
            return await send_error(
                send,
                401,
                f"{what} API key: send the header 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )
        return await self.app(scope, receive, send)


class UploadLimits:
    """413 for a body over ``max_bytes`` (by its Content-Length, or counted as it streams in),
    408 for a client that takes longer than ``timeout_s`` to send it. Reading stops at the
    limit; the application's response to the cut-off body is replaced by the error."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)

    def _too_large(self) -> str:
        return f"the request body is over this service's limit of {self.max_bytes // 2**20} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_error(send, 400, "the Content-Length header is not a number")
            if declared > self.max_bytes:
                return await send_error(send, 413, self._too_large())
        deadline = time.monotonic() + self.timeout_s
        failure: list[tuple[int, str]] = []
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            if failure:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                failure.append(
                    (408, f"the upload took longer than {self.timeout_s:g} s: send it faster")
                )
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    failure.append((413, self._too_large()))
                    return {"type": "http.disconnect"}
            return message

        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if failure:
                if not started and message["type"] == "http.response.start":
                    started = True
                    await send_error(send, *failure[0])
                return  # the application's answer to a body it never fully got
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not failure:
                raise  # a real fault: the server's error handling takes it
            # the application gave up on the cut-off body: expected, the error is the answer
        if failure and not started:
            await send_error(send, *failure[0])
