"""The PROXY protocol, v1 and v2 (`--proxy-protocol`): the client address from the balancer.

A TCP balancer (HAProxy `send-proxy`/`send-proxy-v2`, AWS NLB, ...) that does not speak HTTP
prefixes each connection with a header naming the client it accepted. With the option on, each
accepted connection starts with `ProxyProtocol`, which buffers until the header is complete,
then hands the transport to the protocol `dispatch.connection` gives (HTTP/1.1), with the
header's source address as its peer, and feeds it the bytes that followed. With the option off,
none of this runs.

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (cited as "spec").
Anything but a complete, valid header from a trusted peer closes the connection without a
response: a header cannot be skipped or guessed, and plain HTTP arriving means a balancer
without `send-proxy` (or a client that went around it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

from fulmen.middleware.proxy_headers import ProxyHeaders
from fulmen.protocols import dispatch
from fulmen.protocols.scope import socket_address
from fulmen.state import ServerState

logger = logging.getLogger("fulmen.error")

V1_PREFIX = b"PROXY "
V1_MAX = 107  # spec §2.1: the longest v1 line ("PROXY UNKNOWN" + two IPv6 + ports), CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")  # signature, version/command, family/transport, length
# spec §2.2: address block sizes per family (addresses, then ports or paths).
V2_INET = struct.Struct("!4s4sHH")
V2_INET6 = struct.Struct("!16s16sHH")
V2_UNIX = struct.Struct("!108s108s")
_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1

# The transport methods the HTTP/1.1 connection and the WebSocket cycle call, bound once to the
# real transport: a proxied connection pays no extra call per write.
_DELEGATED = (
    "abort",
    "can_write_eof",
    "close",
    "get_protocol",
    "get_write_buffer_limits",
    "get_write_buffer_size",
    "is_closing",
    "is_reading",
    "pause_reading",
    "resume_reading",
    "set_protocol",
    "set_write_buffer_limits",
    "write",
    "write_eof",
    "writelines",
)

# A peer as the header names it: (host, port) for TCP, a path for UNIX, None for "the real one".
Peer = tuple[str, int] | str | None


class ProxyProtocolError(ValueError):
    """The header is malformed: the connection is closed."""


class ProxiedTransport(asyncio.Transport):
    """The real transport, except that `peername` is the client named by the PROXY header."""

    def __init__(self, transport: asyncio.Transport, peername: tuple[str, int] | str) -> None:
        super().__init__()
        self._transport = transport
        self._peername = peername
        for name in _DELEGATED:
            setattr(self, name, getattr(transport, name))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        return self._transport.get_extra_info(name, default)


def peer_address(peer: Any) -> tuple[str, int] | None:
    """The balancer's address as `ProxyHeaders.trusts` takes it: None for a Unix socket peer."""
    return socket_address(peer)


def parse(data: bytes) -> tuple[Peer, int] | None:
    """Parse a PROXY header at the start of `data`: (peer, header length), or None when more
    bytes are needed. Raises `ProxyProtocolError` when `data` cannot start a valid header."""
    if data[:1] == b"P":
        if not V1_PREFIX.startswith(data[:6]):
            raise ProxyProtocolError("no PROXY protocol header")
        return _parse_v1(data)
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyProtocolError("no PROXY protocol header")
    return _parse_v2(data)


def _parse_v1(data: bytes) -> tuple[Peer, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 line longer than 107 bytes")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":  # spec §2.1: the rest of the line is ignored
        return None, end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 line")
    kind = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    try:
        source = kind(parts[2])
        kind(parts[3])
    except ValueError:
        raise ProxyProtocolError("malformed PROXY v1 address") from None
    _v1_port(parts[5])
    return (str(source), _v1_port(parts[4])), end + 2


def _v1_port(text: str) -> int:
    # spec §2.1: a decimal number 0-65535; no sign, space or leading zero.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError("malformed PROXY v1 port")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError("malformed PROXY v1 port")
    return port


def _parse_v2(data: bytes) -> tuple[Peer, int] | None:
    if len(data) < V2_HEADER.size:
        return None
    _, version_command, family_transport, length = V2_HEADER.unpack_from(data)
    if version_command >> 4 != 2 or version_command & 0xF not in (_LOCAL, _PROXY):
        raise ProxyProtocolError("unsupported PROXY v2 version or command")
    total = V2_HEADER.size + length
    if len(data) < total:
        return None
    body = data[V2_HEADER.size : total]
    family, transport = family_transport >> 4, family_transport & 0xF
    if version_command & 0xF == _LOCAL:  # spec §2.2: a health check; use the real peer
        return None, total
    if family == _UNSPEC:  # spec §2.2: unknown protocol; use the real peer
        return None, total
    if transport != _STREAM:
        raise ProxyProtocolError("PROXY v2 transport is not a stream")
    layout = {_INET: V2_INET, _INET6: V2_INET6, _UNIX: V2_UNIX}.get(family)
    if layout is None or length < layout.size:
        raise ProxyProtocolError("malformed PROXY v2 address block")
    _check_tlvs(body[layout.size :])
    if family == _UNIX:
        path = V2_UNIX.unpack_from(body)[0].split(b"\0", 1)[0]
        return path.decode("utf-8", "replace"), total
    source, _, port, _ = layout.unpack_from(body)
    kind = socket.AF_INET if family == _INET else socket.AF_INET6
    return (socket.inet_ntop(kind, source), port), total


def _check_tlvs(tlvs: bytes) -> None:
    """spec §2.2.7: type-length-value records fill the rest of the block exactly. Fulmen uses
    none of them (ALPN, authority, CRC32C, SSL, ...), but a record overrunning the block is a
    malformed header."""
    offset = 0
    while offset < len(tlvs):
        if offset + 3 > len(tlvs):
            raise ProxyProtocolError("malformed PROXY v2 TLV")
        offset += 3 + int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyProtocolError("malformed PROXY v2 TLV")


class ProxyProtocol(asyncio.Protocol):
    """The first protocol of each connection: read the PROXY header, then hand over."""

    __slots__ = ("buffer", "deadline", "state", "transport", "trusted")

    def __init__(self, state: ServerState, trusted: ProxyHeaders) -> None:
        self.state = state
        self.trusted = trusted
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        state = self.state
        self.deadline = state.clock + state.timeout_request_header
        address = peer_address(transport.get_extra_info("peername"))
        if state.shutting_down or not self.trusted.trusts(address):
            self._refuse("PROXY protocol connection from an untrusted peer")
            return
        state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            parsed = parse(self.buffer)
        except ProxyProtocolError as exc:
            self._refuse(str(exc))
            return
        if parsed is not None:
            self._hand_over(*parsed)

    def eof_received(self) -> bool | None:
        self._refuse("connection closed before the PROXY protocol header was complete")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)

    def check_timeout(self, now: float) -> None:
        """Called by the server tick: a header not complete in the request-header timeout."""
        if now >= self.deadline:
            self._refuse("PROXY protocol header timed out")

    def shutdown(self) -> None:
        """No request has started: close at once."""
        self.transport.close()

    def _refuse(self, reason: str) -> None:
        logger.debug("Closing connection: %s.", reason)
        self.state.connections.discard(self)
        self.transport.abort()  # no response, no lingering: the peer is not speaking to us

    def _hand_over(self, peer: Peer, size: int) -> None:
        self.state.connections.discard(self)
        transport = self.transport
        rest = self.buffer[size:]
        self.buffer = b""
        conn = dispatch.connection(self.state)  # no TLS here (with TLS: proxy_tls), no ALPN
        transport.set_protocol(conn)
        conn.connection_made(transport if peer is None else ProxiedTransport(transport, peer))
        if rest and not transport.is_closing():
            conn.data_received(rest)


def connection_factory(state: ServerState, trusted_hosts: list[str]) -> Callable[[], ProxyProtocol]:
    """The server's protocol factory with `--proxy-protocol` on, without TLS (with TLS, see
    `proxy_tls`), for balancers among `trusted_hosts` (`--forwarded-allow-ips`)."""
    trusted = ProxyHeaders(trusted_hosts)
    return lambda: ProxyProtocol(state, trusted)
