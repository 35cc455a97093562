"""uvicorn's HTTP/1.1 (h11) protocol with connection bounds: per client, in all, and headers due in time."""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

from img2prompt.serve.limits import DEFAULT_LIMITS, ServeLimits

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with connection bounds: at most `limits.max_connections_per_client` open
    connections per client address and `limits.max_connections` in all (more are closed at once), and each
    request's headers due within `limits.header_timeout` of connecting or of the previous response (an idle
    or slowloris connection is closed). Subclassed per server by `guarded_protocol`."""

    limits: ServeLimits = DEFAULT_LIMITS
    open_by_client: dict[str, int] = {}
    header_timer: asyncio.TimerHandle | None = None
    _counted: str | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = self.client[0] if self.client else "?"
        opened = self.open_by_client.get(peer, 0)
        if opened >= self.limits.max_connections_per_client or len(self.connections) > self.limits.max_connections:
            log.debug("refusing a connection from %s (%d open)", peer, opened)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\ncontent-length: 40\r\n\r\n"
                            b'{"detail": "too many open connections"}\n')
            transport.close()
            return
        self.open_by_client[peer] = opened + 1
        self._counted = peer
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        if self._counted is not None:
            left = self.open_by_client.get(self._counted, 1) - 1
            if left > 0:
                self.open_by_client[self._counted] = left
            else:
                self.open_by_client.pop(self._counted, None)
            self._counted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:  # a request's headers have arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the next request's headers are due as the first one's were

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            log.debug("closing a connection from %s: no request headers within %g s",
                      self._counted, self.limits.header_timeout)
            self.transport.close()


def guarded_protocol(limits: ServeLimits) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class with its own limits and per-client counts (one per server)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "open_by_client": {}})
