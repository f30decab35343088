"""TLS after a PROXY protocol header: `--proxy-protocol` together with `--ssl-certfile`.

A TCP balancer writes the PROXY header in clear, then relays the client's TLS bytes. asyncio and
uvloop start TLS the moment they accept, and neither can hand bytes it already read to a later
handshake; the header and the start of the ClientHello often arrive in one segment. So such a
listener accepts its connections itself and reads the header straight from the socket without
taking one byte past it: it peeks, then consumes exactly the bytes that belong to the header.
The socket then goes to `loop.connect_accepted_socket(..., ssl=context)`, which runs the
handshake; then the connection is handed to the protocol `dispatch.connection` gives for the
negotiated ALPN protocol (HTTP/1.1), with the client the header names as its peer.

Only listeners with both options run this; plain `--proxy-protocol` and plain TLS are untouched.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, cast

from fulmen.middleware.proxy_headers import ProxyHeaders
from fulmen.protocols import dispatch
from fulmen.protocols.proxy_protocol import (
    Peer,
    ProxiedTransport,
    ProxyProtocolError,
    parse,
    peer_address,
)
from fulmen.state import ServerState

logger = logging.getLogger("fulmen.error")

PEEK = 4096  # a v1 header is at most 107 bytes; a longer v2 one is read in several peeks
ACCEPT_RETRY_DELAY = 1.0  # out of file descriptors: stop accepting for a second (as asyncio)


class HeaderReader(asyncio.Protocol):
    """One accepted connection until its PROXY header is read. It is one of the server's
    connections meanwhile: the tick times it out, a shutdown closes it. Then it is the protocol
    the TLS handshake reports to, and hands the connection over (`connection_made`)."""

    __slots__ = ("buffer", "deadline", "listener", "peer", "sock")

    def __init__(self, listener: ProxyTLSListener, sock: socket.socket) -> None:
        self.listener = listener
        self.sock = sock
        self.buffer = b""  # the header bytes consumed so far
        self.deadline = listener.state.clock + listener.state.timeout_request_header
        self.peer: Peer = None  # the client the header names, once read

    @property
    def transport(self) -> HeaderReader:
        """The server aborts `conn.transport` of the connections left at the end: this one
        aborts itself."""
        return self

    def readable(self) -> None:
        try:
            data = self.sock.recv(PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):  # pragma: no cover - a spurious wakeup
            return
        except OSError as exc:
            self.abort(f"connection failed before the PROXY protocol header: {exc}")
            return
        if not data:
            self.abort("connection closed before the PROXY protocol header was complete")
            return
        try:
            parsed = parse(self.buffer + data)
        except ProxyProtocolError as exc:
            self.abort(str(exc))
            return
        # Without a complete header every byte seen belongs to it; with one, take its bytes only.
        wanted = len(data) if parsed is None else parsed[1] - len(self.buffer)
        self.buffer += self.sock.recv(wanted)
        if parsed is not None and len(self.buffer) == parsed[1]:
            self.listener.start_tls(self, parsed[0])

    def check_timeout(self, now: float) -> None:
        if now >= self.deadline:
            self.abort("PROXY protocol header timed out")

    def shutdown(self) -> None:
        self.abort("shutting down")

    def abort(self, reason: str = "aborted") -> None:
        logger.debug("Closing connection: %s.", reason)
        self.listener.forget(self)
        self.sock.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The TLS handshake is done: hand the connection to the protocol for the ALPN
        protocol it agreed on, with the client from the header as its peer."""
        tls = cast(asyncio.Transport, transport)
        conn = dispatch.connection(self.listener.state, dispatch.negotiated(tls))
        tls.set_protocol(conn)
        conn.connection_made(tls if self.peer is None else ProxiedTransport(tls, self.peer))


class ProxyTLSListener(asyncio.AbstractServer):
    """Accepts on one listening socket; stands where `loop.create_server` would."""

    def __init__(
        self,
        state: ServerState,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        trusted_hosts: list[str],
        handshake_timeout: float,
        backlog: int,
    ) -> None:
        """Serve `sock` with TLS `context`, for balancers among `trusted_hosts`
        (`--forwarded-allow-ips`); `handshake_timeout` and `backlog` are the options'."""
        self.state = state
        self.loop = state.loop
        self.sock = sock
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.backlog = backlog
        self.trusted = ProxyHeaders(trusted_hosts)
        self.handshakes: set[asyncio.Task[Any]] = set()
        self.retry: asyncio.TimerHandle | None = None  # accepting again after EMFILE & co
        self.serving = True
        self.closed = asyncio.Event()
        sock.setblocking(False)
        sock.listen(backlog)
        self.loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,)

    def _accept(self) -> None:
        for _ in range(self.backlog):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: pause, as asyncio does
                logger.error("socket.accept() failed: %s; retrying in a second.", exc)
                self.loop.remove_reader(self.sock.fileno())
                self.retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            self._admit(conn, peer)

    def _resume(self) -> None:
        self.retry = None
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        conn.setblocking(False)
        if self.state.shutting_down or not self.trusted.trusts(peer_address(peer)):
            logger.debug("Closing connection: PROXY protocol connection from an untrusted peer.")
            conn.close()
            return
        reader = HeaderReader(self, conn)
        self.state.connections.add(reader)
        self.loop.add_reader(conn.fileno(), reader.readable)

    def forget(self, reader: HeaderReader) -> None:
        self.state.connections.discard(reader)
        self.loop.remove_reader(reader.sock.fileno())

    def start_tls(self, reader: HeaderReader, peer: Peer) -> None:
        self.forget(reader)
        reader.peer = peer
        handshake = self.loop.connect_accepted_socket(
            lambda: reader,
            reader.sock,
            ssl=self.context,
            ssl_handshake_timeout=self.handshake_timeout,
        )
        task = self.loop.create_task(handshake)
        self.handshakes.add(task)
        task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[Any]) -> None:
        self.handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("TLS handshake failed: %r", task.exception())

    # asyncio.AbstractServer

    def close(self) -> None:
        if self.serving:
            self.serving = False
            if self.retry is not None:
                self.retry.cancel()
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.closed.set()

    async def wait_closed(self) -> None:
        """Handshakes still running end by themselves within the TLS handshake timeout; a
        connection they make after the shutdown began is closed at once."""
        if self.handshakes:
            await asyncio.wait(list(self.handshakes))

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def is_serving(self) -> bool:
        return self.serving

    async def start_serving(self) -> None:
        """It serves from the start: nothing to do (as for a started asyncio server)."""

    async def serve_forever(self) -> None:
        """Wait until the listener is closed."""
        await self.closed.wait()
