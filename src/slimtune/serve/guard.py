"""Who may ask the server anything: checked on every request before any route runs.

A server on the loopback needs no key, so what keeps other parties out is that only local
programs can reach it. A web page the user visits is such a program, through the browser:
it can send "simple" requests (a form's text/plain POST) to 127.0.0.1, and, through DNS
rebinding (its own host name made to resolve to 127.0.0.1), even read the answers. So, in
this order, each refusal an error in OpenAI's shape:

1. Host (421): on a loopback address only `localhost`, `127.0.0.1` or `[::1]`, with the
   server's port or none, is answered; a rebound name is not.
2. Origin (403): a request that carries one (browsers send it on cross-origin requests and
   on every POST) is refused unless it is the server's own origin (`http://` + Host) or one
   of `--allowed_origins`.
3. The key (401): with `--api_key`, every path but /health needs `Authorization: Bearer KEY`
   (compared in constant time).
4. Content-Type (415): a POST must be `application/json`, which a page can send cross-site
   only after a CORS preflight that this server does not grant (unless the origin is allowed).
5. Content-Length (413): above `--max_body_bytes` (a body without one is counted as it is read).

A plain ASGI middleware, so that it costs nothing on the streaming path and imports nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass, field

from .protocol import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


@dataclass
class Access:
    """The server's rules for who may ask: its bound address, its key, the pages allowed."""

    host: str = "127.0.0.1"  # the address bound
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    def authorized(self, headers: dict[str, str]) -> bool:
        """No key is set, or the request carries it."""
        if not self.api_key:
            return True
        return hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {self.api_key}".encode())

    def refusal(self, method: str, path: str, headers: dict[str, str], port: int | None) -> ApiError | None:
        """Why the request is refused, or None."""
        host = headers.get("host", "")
        if self.loopback and not _local_host(host, port):
            return ApiError(421, f"this server answers only to localhost, 127.0.0.1 or [::1] (Host: {host[:100]!r}); "
                            "a page that rebinds its own name to this address is refused", "host",
                            "host_not_allowed", "permission_error")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self._origins(host):
            return ApiError(403, f"requests from origin {origin[:100]!r} are refused: start the server with "
                            "--allowed_origins ORIGIN to let that page use it", "origin", "origin_not_allowed",
                            "permission_error")
        if method == "OPTIONS":
            return None  # a CORS preflight from an allowed origin: no key, no body
        if path != "/health" and not self.authorized(headers):
            return ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key",
                            kind="authentication_error")
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"the body must be JSON, sent with Content-Type: application/json (got "
                                f"{kind[:60]!r})", "content-type", "unsupported_media_type")
        size = headers.get("content-length")
        if size is not None and (not size.strip().isdigit() or int(size) > self.max_body_bytes):
            return ApiError(413, f"the body is larger than {self.max_body_bytes} bytes (--max_body_bytes)")
        return None

    def _origins(self, host: str) -> set[str]:
        return {o.lower().rstrip("/") for o in self.allowed_origins} | {f"http://{host}".lower(),
                                                                         f"https://{host}".lower()}


def _local_host(host: str, port: int | None) -> bool:
    """A Host header naming the loopback, with this server's port or none."""
    end = host.find("]") + 1 if host.startswith("[") else 0  # an IPv6 address: [::1]:8000
    colon = host.find(":", end)
    name, port_text = (host, None) if colon < 0 else (host[:colon], host[colon + 1:])
    if name.lower() not in LOOPBACK_NAMES:
        return False
    return port_text is None or (port_text.isdigit() and (port is None or int(port_text) == port))


class Guard:
    """ASGI middleware: answer `Access.refusal` before the app sees the request."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            port = (scope.get("server") or (None, None))[1]
            error = self.access.refusal(scope["method"], scope["path"], headers, port)
            if error is not None:
                await send_error(send, error)
                return
        await self.app(scope, receive, send)


async def send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
