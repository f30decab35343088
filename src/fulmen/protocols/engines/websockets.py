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
    __slots__ = ("_failed", "_protocol")

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol
        self._failed = False

    def receive(self, data: bytes) -> list[Event]:
        protocol = self._protocol
        if protocol.current_size is None and not protocol.reader.buffer and protocol.state is OPEN:
            whole = _whole_frames(data)
            if whole is not None:
                return whole
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
        return b"".join(self._protocol.data_to_send())  # b"" (send EOF) is the caller's call

    def message(self, data: bytes | str) -> bytes:
        if not self._protocol.extensions:
            return plain_frame(data)
        if isinstance(data, str):
            self._protocol.send_text(data.encode())
        else:
            self._protocol.send_binary(data)
        return self.output()

    def close(self, code: int, reason: str) -> bytes:
        self._protocol.send_close(code, reason)
        return self.output()

    def ping(self, payload: bytes) -> bytes:
        self._protocol.send_ping(payload)
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
        protocol = _ServerProtocol(SERVER, max_size=self._max_size)
        answer = None
        if offer and self._deflate is not None:
            answer = self._negotiate(protocol, offer.decode("latin-1"))
        return WebsocketsEngine(protocol), answer

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
