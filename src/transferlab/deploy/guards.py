"""What protects the service from hostile clients below the routes: a Host header check (DNS
rebinding), a Content-Security-Policy on every HTML page, a deadline for request headers, and the
turns that bound how many requests hold uploads at once (Turns).

The body's own limits (size, time, rate) are in uploads.read_body.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json

import anyio
from starlette.datastructures import Headers, MutableHeaders
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# The page is self-contained: no request may leave for another origin.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src blob: data:; connect-src 'self'")
# Swagger UI (/docs) loads its script and styles from this origin and runs one inline script.
DOCS_POLICY = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' "
               "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")
# A connection has this long to send its first request's headers (uvicorn waits forever: 1,500
# half-open connections were still held after 30 s).
HEADER_TIMEOUT_S = 10.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# /predict requests beyond max_concurrent wait this long for a turn, then get 503 with Retry-After:
# long enough to ride out a burst (the 2-core machine serves about 100 Lite0 images/s), short enough
# that a client with httpx's default 5 s timeout hears "come back" instead of nothing.
BUSY_WAIT_S = 3.0
RETRY_AFTER_S = 1


def default_allowed_hosts(host: str) -> list[str] | None:
    """The Host headers a service bound to `host` answers by default: on a loopback address, only
    loopback names (a web page elsewhere cannot rebind its own domain name to 127.0.0.1 and read
    the service); bound to every interface, any (name the public ones with --allowed-hosts)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return list(LOOPBACK_NAMES) if loopback else [host]


class Guard:
    """ASGI middleware: refuses a Host header not in `allowed_hosts` (None: any) with the service's
    JSON error shape, and gives every HTML answer that has none a Content-Security-Policy."""

    def __init__(self, app, allowed_hosts: list[str] | None = None):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _host_name(Headers(scope=scope).get("host", ""))
        if self.allowed is not None and "*" not in self.allowed and host not in self.allowed:
            return await _refuse_host(send, host, sorted(self.allowed))

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if (headers.get("content-type", "").startswith("text/html")
                        and "content-security-policy" not in headers):
                    headers["Content-Security-Policy"] = DOCS_POLICY
            await send(message)

        await self.app(scope, receive, send_with_policy)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _refuse_host(send, host: str, allowed: list[str]) -> None:
    body = json.dumps({"error": {"code": "invalid_host", "file": None, "message": (
        f"Host {host!r} is not served here (allowed: {', '.join(allowed)}); start the service "
        "with --allowed-hosts to add names")}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """Uvicorn's HTTP protocol on httptools' C parser (h11's pure-Python one took a fifth of the
    event loop's time per request, see serve.serve) with a deadline for the request headers of a
    new connection: closed after HEADER_TIMEOUT_S unless a request has begun (uvicorn itself then
    times out idle keep-alive connections)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._header_deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request the parser refuses, answered in the service's JSON error shape (uvicorn answers
        plain text) before the connection is closed."""
        body = json.dumps({"error": {"code": "malformed_request", "file": None,
                                     "message": f"{msg}: not a valid HTTP request"}}).encode()
        head = ("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()


class ServiceBusy(Exception):
    """Every turn to send uploads stayed taken for BUSY_WAIT_S: 503 with Retry-After."""


class Turns:
    """The max_concurrent turns to hold uploads in memory, first come, first served; a request
    waits BUSY_WAIT_S at most for one, then hears ServiceBusy."""

    def __init__(self, count: int):
        self.count = count
        self.semaphore = anyio.Semaphore(count)

    @contextlib.asynccontextmanager
    async def take(self):
        try:  # a free turn (never one a waiter is owed: release hands those over directly)
            self.semaphore.acquire_nowait()
        except anyio.WouldBlock:
            await self._wait()
        try:
            yield
        finally:
            self.semaphore.release()

    async def _wait(self) -> None:
        try:
            with anyio.fail_after(BUSY_WAIT_S):
                await self.semaphore.acquire()
        except TimeoutError:
            raise ServiceBusy(f"{self.count} requests are being served and more are waiting: retry "
                              f"in {RETRY_AFTER_S} s") from None
