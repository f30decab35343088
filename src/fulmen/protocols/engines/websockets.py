"""websockets' sans-IO frame layer (`websockets.protocol.Protocol`) as a fulmen engine."""

from __future__ import annotations

from typing import cast

from websockets.exceptions import InvalidHeader, NegotiationError
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.headers import build_extension, parse_extension
from websockets.protocol import OPEN, SERVER, Protocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from fulmen.protocols.engines.base import CLOSE, DATA, NO_STATUS, PONG, Event, plain_frame

# A data frame's opcode -> whether it starts a text message, a binary one, or continues one.
_DATA = {Opcode.TEXT: True, Opcode.BINARY: False, Opcode.CONT: None}


class _ServerProtocol(Protocol):
    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            # RFC 6455 §5.4: control frames may come between the fragments of a message. A close
            # there ends the connection and drops the unfinished message; websockets would
            # answer 1002 "incomplete fragmented message" instead (Autobahn case 7.1.5).
            self.current_size = None
        super().recv_frame(frame)


class WebsocketsEngine:
    """websockets' frame layer for one connection, made when first needed: until then the
    connection has seen only whole data frames (`_whole_frames`), which change none of its
    state, so a fresh one is the same. An idle WebSocket thus holds none (over 1 KiB)."""

    __slots__ = ("_failed", "_max_size", "_protocol")

    def __init__(self, protocol: Protocol | None, max_size: int) -> None:
        self._protocol = protocol  # None: not needed yet (no extension agreed)
        self._max_size = max_size
        self._failed = False

    def _frame_layer(self) -> Protocol:
        protocol = self._protocol
        if protocol is None:
            protocol = self._protocol = _ServerProtocol(SERVER, max_size=self._max_size)
        return protocol

    def receive(self, data: bytes) -> list[Event]:
        protocol = self._protocol
        if protocol is None or (
            protocol.current_size is None and not protocol.reader.buffer and protocol.state is OPEN
        ):
            whole = _whole_frames(data)
            if whole is not None:
                return whole
            protocol = self._frame_layer()
        protocol.receive_data(data)
        events: list[Event] = []
        for frame in protocol.events_received():
            event = _event(protocol, cast(Frame, frame))
            if event is not None:
                events.append(event)
        if protocol.parser_exc is not None and not self._failed:
            # The frame layer failed the connection (1002, 1007, 1009...) and queued the close.
            self._failed = True
            sent = protocol.close_sent
            if sent is not None:
                events.append((CLOSE, int(sent.code), sent.reason))
        return events

    def output(self) -> bytes:
        protocol = self._protocol
        if protocol is None:
            return b""
        return b"".join(protocol.data_to_send())  # b"" (send EOF) is the caller's call

    def message(self, data: bytes | str) -> bytes:
        protocol = self._protocol
        if protocol is None or not protocol.extensions:
            return plain_frame(data)
        if isinstance(data, str):
            protocol.send_text(data.encode())
        else:
            protocol.send_binary(data)
        return self.output()

    def close(self, code: int, reason: str) -> bytes:
        self._frame_layer().send_close(code, reason)
        return self.output()

    def ping(self, payload: bytes) -> bytes:
        self._frame_layer().send_ping(payload)
        return self.output()


def _whole_frames(data: bytes) -> list[Event] | None:
    """The messages in `data` if it holds only whole, masked, unfragmented, uncompressed text or
    binary frames with a payload under 64 KiB, else None.

    That is nearly every read on a busy WebSocket. Between messages such frames change no state
    of the frame layer (the compression context included: RSV1 is clear), so they are read here
    without its general parser, which costs more than the rest of the message's path; anything
    else (control frames, fragments, partial frames, bad frames) goes to websockets.
    """
    events: list[Event] = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 6:
            return None
        first = data[pos]
        if first != 0x81 and first != 0x82:  # FIN, no RSV bit, text or binary
            return None
        length = data[pos + 1] ^ 0x80  # the mask bit must be set (RFC 6455 §5.3)
        if length < 126:
            start = pos + 6
        elif length == 126 and end - pos >= 8:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            start = pos + 8
        else:
            return None  # unmasked, a 64-bit length, or an incomplete header
        stop = start + length
        if stop > end:
            return None
        payload = apply_mask(data[start:stop], data[start - 4 : start])
        events.append((DATA, payload, first == 0x81, True))
        pos = stop
    return events


def _event(protocol: Protocol, frame: Frame) -> Event | None:
    opcode = frame.opcode
    if opcode in _DATA:
        return (DATA, bytes(frame.data), _DATA[opcode], frame.fin)
    if opcode is Opcode.PONG:
        return (PONG, bytes(frame.data))
    if opcode is Opcode.CLOSE:
        received = protocol.close_rcvd
        if received is None:  # pragma: no cover - websockets parses every close frame it reports
            return (CLOSE, NO_STATUS, "")
        return (CLOSE, int(received.code), received.reason)
    return None  # a ping: websockets has queued the pong


class WebsocketsFactory:
    """Engines with `--ws-max-size` enforced by websockets, inflated data included."""

    __slots__ = ("_deflate", "_max_size")

    def __init__(self, max_size: int, deflate: bool) -> None:
        self._max_size = max_size
        self._deflate = ServerPerMessageDeflateFactory() if deflate else None

    def __call__(self, offer: bytes | None) -> tuple[WebsocketsEngine, bytes | None]:
        if not offer or self._deflate is None:
            return WebsocketsEngine(None, self._max_size), None
        protocol = _ServerProtocol(SERVER, max_size=self._max_size)
        answer = self._negotiate(protocol, offer.decode("latin-1"))
        return WebsocketsEngine(protocol if answer else None, self._max_size), answer

    def _negotiate(self, protocol: Protocol, offer: str) -> bytes | None:
        """RFC 7692 §5: accept the first permessage-deflate offer we can."""
        assert self._deflate is not None
        try:
            offers = parse_extension(offer)
        except InvalidHeader:
            return None  # an unreadable offer: go on without compression
        for name, params in offers:
            if name != self._deflate.name:
                continue
            try:
                response, extension = self._deflate.process_request_params(params, [])
            except NegotiationError:
                continue
            protocol.extensions = [extension]
            return build_extension([(name, response)]).encode("latin-1")
        return None
