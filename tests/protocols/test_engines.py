"""The engine seam: choosing an engine, and the shared plain-frame writer and whole-frame reader.

Everything else an engine does is tested through real sockets in test_websocket_*.py; these are
the pure functions whose every branch a socket test would reach only by chance.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import pytest
from click.testing import CliRunner
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from fulmen import Config
from fulmen.cli import main
from fulmen.protocols.engines import engine_factory, engine_name
from fulmen.protocols.engines.base import DATA, plain_frame
from fulmen.protocols.engines.websockets import WebsocketsFactory, _whole_frames

SIZES = [0, 1, 125, 126, 65535, 65536, 70000]


def _parse(data: bytes, mask: bool) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=mask)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("text", [True, False], ids=["text", "binary"])
def test_plain_frame_is_what_websockets_reads(size: int, text: bool) -> None:
    payload = "é" * (size // 2) + "x" * (size % 2) if text else os.urandom(size)
    frame = _parse(plain_frame(payload), mask=False)
    assert frame.fin and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
    assert frame.opcode is (Opcode.TEXT if text else Opcode.BINARY)
    expected = payload.encode() if isinstance(payload, str) else payload
    assert frame.data == expected


def _client_frame(payload: bytes, opcode: Opcode = Opcode.TEXT, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=True)


@pytest.mark.parametrize("size", [0, 5, 125, 126, 1000, 65535])
def test_whole_frames_reads_masked_frames(size: int) -> None:
    text, binary = os.urandom(size), os.urandom(size)
    data = _client_frame(text) + _client_frame(binary, Opcode.BINARY)
    assert _whole_frames(data) == [(DATA, text, True, True), (DATA, binary, False, True)]


@pytest.mark.parametrize(
    "data",
    [
        _client_frame(b"x" * 65536),  # 64-bit length: left to websockets
        _client_frame(b"hello")[:-1],  # incomplete payload
        _client_frame(b"x" * 300)[:3],  # incomplete extended length
        _client_frame(b"hello") + b"\x81",  # a complete frame, then part of a header
        _client_frame(b"hello", fin=False),  # a fragment
        _client_frame(b"", Opcode.PING),  # a control frame
        Frame(Opcode.TEXT, b"hello").serialize(mask=False),  # unmasked: a protocol error
        b"\xc1" + _client_frame(b"hello")[1:],  # RSV1: compressed
    ],
    ids=["64-bit", "partial", "partial-length", "trailing", "fragment", "ping", "unmasked", "rsv1"],
)
def test_whole_frames_leaves_everything_else_to_websockets(data: bytes) -> None:
    assert _whole_frames(data) is None


def test_engine_handles_reads_the_fast_path_cannot() -> None:
    """A frame split over two reads, then a ping: websockets' own parser takes over."""
    engine, answer = WebsocketsFactory(1 << 20, deflate=True)(None)
    assert answer is None
    data = _client_frame(b"hello")
    assert engine.receive(data[:3]) == []
    assert engine.receive(data[3:]) == [(DATA, b"hello", True, True)]
    assert engine.receive(_client_frame(b"hi", Opcode.PING)) == []
    assert _parse(engine.output(), mask=False).opcode is Opcode.PONG


def test_the_frame_layer_is_made_only_when_needed() -> None:
    """Whole data frames need no frame layer (an idle WebSocket holds none); the first read
    that does gets a fresh one, which is then in the state it would have been in anyway."""
    engine, _ = WebsocketsFactory(1 << 20, deflate=True)(None)
    assert engine.receive(_client_frame(b"one") + _client_frame(b"two", Opcode.BINARY)) == [
        (DATA, b"one", True, True),
        (DATA, b"two", False, True),
    ]
    assert engine._protocol is None and engine.output() == b""
    assert engine.message("out") == plain_frame("out")
    first = _client_frame(b"frag", fin=False)
    assert engine.receive(first) == [(DATA, b"frag", True, False)]
    assert engine._protocol is not None
    assert engine.receive(_client_frame(b"ment", Opcode.CONT)) == [(DATA, b"ment", None, True)]


@pytest.mark.parametrize("kind", ["ping", "close"])
def test_control_frames_sent_before_any_read(kind: str) -> None:
    engine, _ = WebsocketsFactory(1 << 20, deflate=False)(None)
    data = engine.ping(b"p") if kind == "ping" else engine.close(1001, "bye")
    frame = _parse(data, mask=False)
    assert frame.opcode is (Opcode.PING if kind == "ping" else Opcode.CLOSE)


def test_an_agreed_extension_has_its_frame_layer_from_the_start() -> None:
    factory = WebsocketsFactory(1 << 20, deflate=True)
    engine, answer = factory(b"permessage-deflate; client_max_window_bits")
    assert answer is not None and answer.startswith(b"permessage-deflate")
    assert engine._protocol is not None and engine._protocol.extensions
    refused, none = factory(b"x-unknown-extension")
    assert none is None and refused._protocol is None


def test_auto_prefers_websockets() -> None:
    assert engine_name("auto") == "websockets"
    assert engine_name("websockets-sansio") == "websockets"
    assert engine_factory("none", 1, True) is None


def test_websockets_older_than_16_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "15.0.1" if name == "websockets" else real(name),
    )
    assert engine_name("auto") == "wsproto"
    with pytest.raises(ValueError, match=r"--ws websockets needs the websockets library >=16"):
        Config("app:app", ws="websockets")


def test_missing_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name in ("websockets", "wsproto") else real(name, *args),
    )
    assert engine_name("auto") == "none"
    with pytest.raises(ValueError, match="--ws wsproto needs the wsproto library installed"):
        Config("app:app", ws="wsproto")
    result = CliRunner().invoke(main, ["app:app", "--ws", "wsproto"])
    assert result.exit_code == 2
    assert "needs the wsproto library" in result.output
