"""The UDP listener of HTTP/3 (`--http3`): one socket on the TLS port, its datagrams routed
to their QUIC connections by connection ID (RFC 9000 §5.2).

A datagram that opens a connection is checked before anything is kept for it:

- Address validation (Retry, RFC 9000 §8.1.2), on by default (`--http3-retry`): the first
  Initial gets a Retry with a token bound to the client's address, and only an Initial
  that returns it opens a connection. A spoofed source address then costs the server one
  small packet, never a handshake, so the server cannot be used to amplify.
- At most `MAX_PER_ADDRESS` connections from one address; beyond it, Initials are dropped.
- Versions the server does not speak get a Version Negotiation packet (§6).

Connection migration is off: a connection's datagrams must come from the address that opened
it (others are dropped, not used to validate a new path). 0-RTT is never accepted (no session
tickets are issued), so no request can be replayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import struct
from typing import Any

from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    pull_quic_header,
)

from fulmen.middleware.proxy_headers import ProxyHeaders
from fulmen.protocols.http3 import H3Connection
from fulmen.protocols.quicconn import Quic
from fulmen.protocols.scope import socket_address
from fulmen.state import ServerState

logger = logging.getLogger("fulmen.error")

CID_LENGTH = 8  # the connection IDs the server issues (aioquic's default)
MIN_INITIAL_SIZE = 1200  # RFC 9000 §14.1: a client's Initial fills a datagram this large
MAX_PER_ADDRESS = 64  # QUIC connections open at once from one client address
TOKEN_LIFETIME = 10.0  # seconds a Retry token is good for
MIN_IDLE_TIMEOUT = 30.0  # QUIC's idle timeout, at least (a peer that vanished)
_TOKEN = struct.Struct("!dB")  # issue time, length of the original destination CID


class RetryTokens:
    """Retry tokens (RFC 9000 §8.1.4): the client's address, the time and the original
    destination CID, under an HMAC whose key lives as long as the process."""

    def __init__(self) -> None:
        self.key = os.urandom(32)

    def _mac(self, addr: Any, body: bytes) -> bytes:
        message = f"{addr[0]}|{addr[1]}|".encode() + body
        return hmac.new(self.key, message, hashlib.sha256).digest()

    def create(self, addr: Any, odcid: bytes, rscid: bytes, now: float) -> bytes:
        body = _TOKEN.pack(now, len(odcid)) + odcid + rscid
        return body + self._mac(addr, body)

    def validate(self, addr: Any, dcid: bytes, token: bytes, now: float) -> bytes | None:
        """The original destination CID of a valid token sent to `dcid` (the Retry's source
        CID), else None."""
        body, mac = token[:-32], token[-32:]
        if len(body) < _TOKEN.size or not hmac.compare_digest(mac, self._mac(addr, body)):
            return None
        issued, size = _TOKEN.unpack_from(body)
        odcid = body[_TOKEN.size : _TOKEN.size + size]
        if body[_TOKEN.size + size :] != dcid or not 0 <= now - issued <= TOKEN_LIFETIME:
            return None
        return odcid


def quic_configuration(
    certfile: str, keyfile: str | None, password: str | None, idle_timeout: float
) -> QuicConfiguration:
    """The QUIC side of the server: ALPN h3, the certificate of --ssl-certfile."""
    configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=["h3"],
        idle_timeout=idle_timeout,
        connection_id_length=CID_LENGTH,
    )
    # The key may sit in the certificate file, as Python's ssl module allows.
    configuration.load_cert_chain(certfile, keyfile or certfile, password)
    return configuration


class QuicListener(asyncio.DatagramProtocol):
    """One UDP socket: its QUIC connections, by every connection ID they use."""

    def __init__(
        self,
        state: ServerState,
        tls: tuple[str, str | None, str | None],
        retry: bool,
        max_streams: int,
    ) -> None:
        """`tls`: the certificate file, key file and key password; `retry`: validate
        addresses (--http3-retry); `max_streams`: per connection (--h2-max-concurrent-streams).
        """
        self.state = state
        # QUIC's own idle timeout, for a peer that vanished; a connection with no request
        # is closed sooner, after --timeout-keep-alive (`H3Connection.check_timeout`).
        self.idle_timeout = max(MIN_IDLE_TIMEOUT, float(state.timeout_keep_alive))
        self.configuration = quic_configuration(*tls, self.idle_timeout)
        self.versions = self.configuration.supported_versions
        self.max_streams = max_streams
        self.tokens = RetryTokens() if retry else None
        self.proxy: ProxyHeaders | None = state.proxy_headers
        self.routes: dict[bytes, H3Connection] = {}
        self.per_address: dict[str, int] = {}
        self.connections: set[H3Connection] = set()
        self.accepting = True
        self.address: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        # The ASGI `tls` extension of HTTP/3 requests: TLS 1.3 (QUIC has no other), no client
        # certificate (--http3 refuses --ssl-cert-reqs 2).
        self.tls: dict[str, Any] = {
            "server_cert": state.server_cert,
            "client_cert_chain": [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": 0x0304,
            "cipher_suite": None,
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.address = socket_address(transport.get_extra_info("sockname"))
        self.sendto = transport.sendto  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not data:
            return
        if not data[0] & 0x80:  # a short header: an established connection
            conn = self.routes.get(data[1 : 1 + CID_LENGTH])
            if conn is not None and conn.addr == addr:
                conn.datagram_received(data, addr)
            return
        version = int.from_bytes(data[1:5], "big")
        if version not in self.versions:  # read as RFC 8999's invariants, nothing more
            if version and len(data) >= MIN_INITIAL_SIZE:  # (0: a Version Negotiation)
                self._negotiate(data, addr)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return
        conn = self.routes.get(header.destination_cid)
        if conn is not None:
            if conn.addr == addr:
                conn.datagram_received(data, addr)
            return
        if (
            header.packet_type is QuicPacketType.INITIAL
            and len(data) >= MIN_INITIAL_SIZE
            # RFC 9000 §7.2: a client's first Destination Connection ID has 8 bytes at least.
            and len(header.destination_cid) >= CID_LENGTH
        ):
            self._initial(data, addr, header)

    def _negotiate(self, data: bytes, addr: Any) -> None:
        """A version the server does not speak: Version Negotiation (RFC 9000 §6), echoing
        the connection IDs as RFC 8999 §5.1 lays them out for any version."""
        dcid_end = 6 + data[5]
        if len(data) <= dcid_end:
            return
        scid_end = dcid_end + 1 + data[dcid_end]
        if len(data) < scid_end:
            return
        # The packet (RFC 9000 §17.2.1), built here: its CIDs may be longer than QUIC v1's 20
        # bytes (another version's), which aioquic's encoder refuses.
        dcid, scid = data[dcid_end + 1 : scid_end], data[6:dcid_end]
        packet = b"%c\0\0\0\0%c%s%c%s" % (0x80 | os.urandom(1)[0], len(dcid), dcid, len(scid), scid)
        self.sendto(packet + b"".join(v.to_bytes(4, "big") for v in self.versions), addr)

    def _initial(self, data: bytes, addr: Any, header: Any) -> None:
        """An Initial for no known connection: a new connection, if it may open one."""
        if not self.accepting:
            return
        host = addr[0]
        if self.per_address.get(host, 0) >= MAX_PER_ADDRESS:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("HTTP/3: too many connections from %s, Initial dropped", host)
            return
        odcid: bytes | None = header.destination_cid
        rscid = None
        if self.tokens is not None:
            now = self.state.loop.time()
            if not header.token:
                rscid = os.urandom(CID_LENGTH)
                token = self.tokens.create(addr, header.destination_cid, rscid, now)
                retry = encode_quic_retry(
                    version=header.version,
                    source_cid=rscid,
                    destination_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    retry_token=token,
                )
                self.sendto(retry, addr)
                return
            odcid = self.tokens.validate(addr, header.destination_cid, header.token, now)
            if odcid is None:  # forged, stale, or from another address: dropped (§8.1.3)
                return
            rscid = header.destination_cid
        quic = Quic(
            self.max_streams,
            configuration=self.configuration,
            original_destination_connection_id=odcid,
            retry_source_connection_id=rscid,
        )
        conn = H3Connection(self, quic, addr)
        self.connections.add(conn)
        self.per_address[host] = self.per_address.get(host, 0) + 1
        self.route(header.destination_cid, conn)
        self.route(quic.host_cid, conn)
        conn.datagram_received(data, addr)

    def route(self, cid: bytes, conn: H3Connection) -> None:
        self.routes[cid] = conn
        conn.cids.add(cid)

    def unroute(self, cid: bytes, conn: H3Connection) -> None:
        if self.routes.get(cid) is conn:
            del self.routes[cid]
        conn.cids.discard(cid)

    def forget(self, conn: H3Connection) -> None:
        """A connection is over: its routes and its count against its address go."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        for cid in conn.cids:
            if self.routes.get(cid) is conn:
                del self.routes[cid]
        conn.cids.clear()
        host = conn.addr[0]
        left = self.per_address.get(host, 1) - 1
        if left:
            self.per_address[host] = left
        else:
            self.per_address.pop(host, None)

    def stop_accepting(self) -> None:
        """Shutdown: no new connection; the open ones are served until they close."""
        self.accepting = False

    def close(self) -> None:
        """The end of a shutdown: the socket closes, and with it whatever connection is still
        in its closing period (RFC 9000 §10.2)."""
        for conn in list(self.connections):
            conn.terminate()
        if self.transport is not None:
            self.transport.close()
