"""Host and Origin: which Host names the server answers to (DNS rebinding) and which Origins may POST
(cross-site forms), checked by an ASGI middleware before any route runs."""
from __future__ import annotations

import contextlib
import socket
from typing import Sequence
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from img2prompt.serve.limits import DEFAULT_HOST

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def host_name(value: str) -> str:
    """A Host header or address → its lower-case name without port or brackets ("[::1]:80" → "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class HostPolicy:
    """Which Host names the server answers to (DNS rebinding: a page of evil.example whose name now points
    at 127.0.0.1 sends Host: evil.example) and which Origins may POST (a cross-site form or fetch)."""

    def __init__(self, bound: str | None = DEFAULT_HOST, allowed: Sequence[str] = ()) -> None:
        self.any = "*" in allowed
        self.extra = {host_name(name) for name in allowed if name != "*"}
        self.names = set(LOOPBACK_NAMES) | self.extra
        if bound is not None and host_name(bound) not in WILDCARD_HOSTS:
            self.names.add(host_name(bound))
        elif bound is not None:  # all interfaces: this machine's own names and addresses too
            self.names |= _machine_names()

    def refusal(self, method: str, host: str | None, origin: str | None) -> str | None:
        """Why a request is refused (403), or None."""
        if not self.any and (host is None or host_name(host) not in self.names):
            return (f"Host {host!r} is not a name this server answers to (start it with --allowed-host "
                    f"{host_name(host or '') or 'NAME'} to allow it)")
        if origin is None or method in SAFE_METHODS:
            return None
        parts = urlsplit(origin)
        same_origin = host is not None and parts.netloc.lower() == host.strip().lower()
        if same_origin or (parts.hostname and (self.any or host_name(parts.hostname) in self.extra)):
            return None
        return f"cross-origin request from {origin!r} refused"


def _machine_names() -> set[str]:
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    with contextlib.suppress(OSError):
        names |= {info[4][0].lower() for info in socket.getaddrinfo(socket.gethostname(), None)}
    return {host_name(name) for name in names if name}


class HostGuard:
    """ASGI middleware: every HTTP request passes HostPolicy before any route (the page included) runs."""

    def __init__(self, app, policy: HostPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {name.decode(): value.decode("latin-1") for name, value in scope["headers"]
                       if name in (b"host", b"origin")}
            reason = self.policy.refusal(scope["method"], headers.get("host"), headers.get("origin"))
            if reason:
                await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
