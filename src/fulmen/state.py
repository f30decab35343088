"""What every connection of one server shares: settings computed once, and live counters."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from fulmen.access import DEFAULT_ACCESS_FORMAT, AccessFormat, timed_app
from fulmen.config import Config
from fulmen.middleware.proxy_headers import ProxyHeaders
from fulmen.protocols import wire
from fulmen.protocols.engines import engine_factory
from fulmen.protocols.parsers import Limits, SpareParsers, parser_class
from fulmen.protocols.tls_scope import server_cert
from fulmen.types import ASGIApp

access_logger = logging.getLogger("fulmen.access")


class Abortable(Protocol):
    def abort(self) -> None: ...


class Connection(Protocol):
    """What the server needs of an open connection (HTTP/1.1 or WebSocket)."""

    @property
    def transport(self) -> Abortable: ...

    def check_timeout(self, now: float) -> None: ...

    def shutdown(self) -> None: ...


class H2Takeover(Protocol):
    """Hands a connection's transport to HTTP/2, with the bytes already read and, for an
    `Upgrade: h2c` request, that request (`fulmen.protocols.http2.Upgrade`)."""

    def __call__(
        self, state: ServerState, transport: Any, data: bytes, upgrade: Any = None
    ) -> None: ...


class ServerState:
    """Settings read on the hot path, precomputed from `Config`, plus shared live state."""

    def __init__(
        self,
        config: Config,
        app: ASGIApp,
        app_state: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        on_max_requests: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.app_state = app_state
        # Each request runs in a copy of the server's context, never of another request's.
        self.context = contextvars.copy_context()
        self.loop = loop
        self.limits = Limits(config.limit_request_line, config.h11_max_incomplete_event_size)
        self.parsers = SpareParsers(parser_class(config.http), self.limits)
        self.root_path = config.root_path
        self.server_cert = server_cert(config.ssl_certfile)  # for the `tls` scope extension
        self.timeout_keep_alive = config.timeout_keep_alive
        self.timeout_request_header = config.timeout_request_header
        self.timeout_request_body = config.timeout_request_body
        self.timeout_send = config.timeout_send
        self.limit_concurrency = config.limit_concurrency or 0
        self.limit_max_requests = config.limit_max_requests or 0
        self.limit_request_body = config.limit_request_body
        self.h2_max_streams = config.h2_max_concurrent_streams
        # Set by `fulmen.protocols.dispatch.enable_http2`: takes a cleartext HTTP/1.1
        # connection over to HTTP/2 (h2c prior knowledge or Upgrade).
        self.http2: H2Takeover | None = None
        self.on_max_requests = on_max_requests
        # WSGI has no WebSockets: its upgrade requests are plain HTTP requests (as uvicorn).
        ws = "none" if config.interface == "wsgi" else config.ws
        self.ws_factory = engine_factory(ws, config.ws_max_size, config.ws_per_message_deflate)
        self.ws_max_size = config.ws_max_size
        self.ws_max_queue = config.ws_max_queue
        self.ws_ping_interval = config.ws_ping_interval or 0.0
        self.ws_ping_timeout = config.ws_ping_timeout or 0.0
        self.proxy_headers = (
            ProxyHeaders(config.trusted_hosts, config.proxy_headers_mode, config.proxy_headers_host)
            if config.proxy_headers
            else None
        )
        self.access_log = config.access_log and access_logger.isEnabledFor(logging.INFO)
        # None: the default text line, written directly. Fields are computed only when logged,
        # and the app is wrapped to time and count the body only when the format uses them.
        self.access_format: AccessFormat | None = None
        if self.access_log and (config.access_log_format or config.log_format == "json"):
            self.access_format = AccessFormat(config.access_log_format or DEFAULT_ACCESS_FORMAT)
            if self.access_format.timed:
                self.app = timed_app(app)
        self.connections: set[Connection] = set()
        # TLS connections accepted, their handshake not done (`dispatch.AfterHandshake`).
        self.handshaking: weakref.WeakSet[asyncio.Protocol] = weakref.WeakSet()
        self.tasks: set[asyncio.Task[None]] = set()
        self.total_requests = 0
        self.shutting_down = False
        # The close code a graceful shutdown sends open WebSockets: 1001 (going away), or 1012
        # (service restart) when the server is being restarted (`Server.restart`).
        self.ws_shutdown_code = 1001
        self.clock = loop.time()
        self._header_options = (config.server_header, config.date_header, config.header_pairs())
        self.default_lines: list[tuple[bytes, bytes]] = []
        self.default_fields: list[tuple[bytes, bytes]] = []  # (name, value), for HTTP/2
        self.default_headers = b""
        self.tick()

    def advertise_http3(self, port: int) -> None:
        """`Alt-Svc: h3=":PORT"` on every response (RFC 9114 §3.1.1, RFC 7838): clients that
        speak HTTP/3 move to it. HTTP/3 needs TLS, so every listener serves TLS."""
        server, date, pairs = self._header_options
        if any(name.lower() == "alt-svc" for name, _ in pairs):
            return  # --header 'Alt-Svc: ...' (behind a port mapping): the operator's, alone
        alt_svc = ("alt-svc", f'h3=":{port}"; ma=86400')
        self._header_options = (server, date, [*pairs, alt_svc])
        self.tick()

    def tick(self) -> None:
        """Once a second: refresh the coarse clock and the `date`/`server` header block."""
        self.clock = self.loop.time()
        self.default_lines = wire.default_header_lines(*self._header_options)
        self.default_headers = b"".join(line for _, line in self.default_lines)
        self.default_fields = [
            (name, line[len(name) + 2 : -2]) for name, line in self.default_lines
        ]

    def defaults_without(self, names: frozenset[bytes]) -> bytes:
        """The default header block minus headers the application set itself."""
        return b"".join(line for name, line in self.default_lines if name not in names)
