"""llhttp's request vectors replayed against both parser adapters and fulmen's own rules.

The corpus (`../shared/corpora/llhttp/request/*.md`, MIT, see PROVENANCE.md there) is llhttp's
markdown test suite: each `http` block is a raw request and the `log` block after it is what
llhttp's strict mode made of it; an `error code=N` line means it was rejected.

Three levels are checked:

- the adapters alone (`parser_class(name)` with a recording `ParserCallbacks` and `Limits()`):
  httptools is llhttp, so it must reproduce every strict verdict; this also proves the loader
  decodes the vectors as llhttp's own harness does;
- fulmen: an adapter under the real `H1Connection` (the `on_request` rules, keep-alive,
  pipelining) and a real event loop, with a transport that records what is written, so every
  vector gets an exact verdict. Both parsers must serve the same requests and agree on
  rejecting; fulmen must never serve a request strict llhttp rejects; and it serves every
  request llhttp accepts unless one of fulmen's own rules (listed in STRICTER) says otherwise;
- every vector through a real server over a raw socket, sent as it is, with no end of stream
  after it, on both parsers and both loops: the server must answer as the harness predicts,
  at once (a head that can never be valid is answered as soon as its bytes show it, not at
  the header timeout).

Most vectors carry no Host header, which fulmen rightly rejects for HTTP/1.1 (RFC 9112 §3.2).
So that the framing rules are exercised rather than the Host rule, the fulmen-level checks also
run each vector with a Host field added to every request llhttp saw begin ("with-host"), and
that variant followed by an empty line ("completed"), which ends a head cut short so that a
parser that waits for the end of a head (h11) reaches its verdict too.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fulmen import Config
from fulmen.protocols.http1 import H1Connection
from fulmen.protocols.parsers import Limits, ParseError, parser_class
from fulmen.state import ServerState
from tests.conftest import RunningServer, start_server
from tests.protocols.harness import FakeTransport
from tests.protocols.http1_raw import poll_until

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "llhttp" / "request"
PARSERS = ("h11", "httptools")

# Why a vector is not replayed. Every skipped vector has one of these reasons.
SKIP_REASONS = {
    "lenient": "relies on an llhttp lenient flag (meta type request-lenient-*)",
    "finish": "tests llhttp_finish() at end of input, not a verdict on the bytes",
    "skip-body": "relies on on_headers_complete returning 1 (skip the body), a callback flag",
    "response": "a response vector; fulmen parses requests only",
    "javascript": "input is built by a JavaScript `${...}` expression",
    "method": "extension method: RFC 9110 §9.1 lets any token be a method (the server may "
    "answer 501); llhttp knows a fixed list, h11 takes any token",
}
# Vectors whose verdict the RFC leaves to the server, by (file, section).
OPEN_CHOICE = {
    ("invalid.md", "Invalid method"): "method",
    ("invalid.md", "HTTP protocol and ANNOUNCE method"): "method",
}
# Requests llhttp accepts that fulmen rejects on purpose (both parsers), by section.
STRICTER = {
    "CONNECT request": "CONNECT (authority-form target) is for proxies: 400",
    "CONNECT request with CAPS": "CONNECT (authority-form target) is for proxies: 400",
    "CONNECT with body": "CONNECT (authority-form target) is for proxies: 400",
    "Underscore in hostname": "CONNECT (authority-form target) is for proxies: 400",
    "No HTTP version": "an HTTP/0.9 request: 505 (RFC 9110 §15.6.6)",
    "POST with `chunked` as last transfer-encoding": "unknown coding `deflate`: 501 (RFC 9112 "
    "§6.1)",
    "POST with `chunked` as last transfer-encoding (multiple headers)": "unknown coding "
    "`deflate`: 501 (RFC 9112 §6.1)",
    "PRI request HTTP2": "the method of HTTP/2's connection preface, never an HTTP/1.1 request "
    "(RFC 9113 §3.4, §11.6): 400 (llhttp pauses there for an HTTP/2 takeover)",
    "SOURCE request with ICE": "not HTTP (RFC 9112 §2.3): 400 with h11",
    "OPTIONS request with RTSP": "not HTTP (RFC 9112 §2.3): 400 with h11",
    "ANNOUNCE request with RTSP": "not HTTP (RFC 9112 §2.3): 400 with h11",
}
# Known disagreements: the test runs and must fail (strict xfail) until fixed.
DIVERGENT: dict[str, str] = {}
# llhttp also speaks RTSP and ICE, and pauses at HTTP/2's preface (PRI) for a takeover; fulmen's
# HTTP/1.1 refuses them at once (RFC 9112 §2.3, RFC 9113 §3.4), on both parsers.
NOT_HTTP = frozenset(
    (
        "SOURCE request with ICE",
        "OPTIONS request with RTSP",
        "ANNOUNCE request with RTSP",
        "PRI request HTTP2",
    )
)
# llhttp error codes that are pauses, not rejections: HPE_PAUSED, HPE_PAUSED_UPGRADE,
# HPE_PAUSED_H2_UPGRADE.
PAUSE_CODES = frozenset((21, 22, 23))


# Loading


@dataclass(frozen=True)
class Vector:
    file: str
    section: str
    meta: dict[str, Any] = field(hash=False)
    raw: bytes
    starts: tuple[int, ...]  # offsets where llhttp saw a message begin
    llhttp_error: str | None  # the reason of llhttp's strict error, None when accepted
    llhttp_messages: int  # messages llhttp completed (before its error, if any)
    skip: str | None  # a key of SKIP_REASONS

    @property
    def id(self) -> str:
        return f"{self.file}:{self.section}"


_HEADING = re.compile(r"^(#+)\s+(.*?)\s*$")
_META = re.compile(r"<!--\s*meta=(\{.*\})\s*-->")
_LOG_BEGIN = re.compile(r"^off=(\d+) message begin$")
_LOG_ERROR = re.compile(r"error code=(\d+) reason=\"(.*)\"")


def decode(block: str) -> bytes:
    """The raw bytes of an `http` block, decoded as llhttp's test harness does."""
    text = block[:-1] if block.endswith("\n") else block  # drop one trailing newline
    data = text.encode("utf-8")
    data = re.sub(rb"\\(\r\n|\r|\n)", b"", data)  # a backslash at end of line joins lines
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    for escape, byte in ((rb"\\r", b"\r"), (rb"\\n", b"\n"), (rb"\\t", b"\t"), (rb"\\f", b"\f")):
        data = re.sub(escape, lambda _, byte=byte: byte, data)
    data = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), data)
    return re.sub(rb"\\([0-7]{1,3})", lambda m: bytes([int(m[1], 8) & 0xFF]), data)


def _blocks(lines: list[str]) -> list[tuple[str, dict[str, Any], str, str]]:
    """(section, meta, http block, log block) for each test in one markdown file."""
    tests = []
    section = ""
    meta: dict[str, Any] = {}
    http: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _HEADING.match(line)
        meta_match = _META.search(line)
        if heading:
            section = heading[2]
        elif meta_match:
            meta = json.loads(meta_match[1])
        elif line.startswith("```http") or line.startswith("```log"):
            end = lines.index("```", i + 1)
            body = "".join(f"{text}\n" for text in lines[i + 1 : end])
            if line.startswith("```http"):
                http = body
            else:
                assert http is not None, f"log block without http block at line {i}"
                tests.append((section, meta, http, body))
                http, meta = None, {}
            i = end
        i += 1
    return tests


def _skip_reason(file: str, section: str, meta: dict[str, Any], block: str) -> str | None:
    kind = str(meta.get("type", ""))
    if kind.startswith("response"):
        return "response"
    if "lenient" in kind or "flags" in meta:
        return "lenient"
    if kind == "request-finish":
        return "finish"
    if meta.get("skipBody"):
        return "skip-body"
    if "${" in block:
        return "javascript"
    return OPEN_CHOICE.get((file, section))


def load() -> list[Vector]:
    vectors = []
    for path in sorted(CORPUS.glob("*.md")):
        lines = path.read_text("utf-8").split("\n")
        for section, meta, block, log in _blocks(lines):
            starts = []
            error = None
            messages = 0
            for entry in log.splitlines():
                begin = _LOG_BEGIN.match(entry)
                if begin:
                    starts.append(int(begin[1]))
                if entry.endswith(" message complete"):
                    messages += 1
                found = _LOG_ERROR.search(entry)
                if found and int(found[1]) not in PAUSE_CODES:
                    error = found[2]
                    break
            skip = _skip_reason(path.name, section, meta, block)
            raw = decode(block)
            vectors.append(
                Vector(path.name, section, meta, raw, tuple(starts), error, messages, skip)
            )
    return vectors


VECTORS = load() if CORPUS.is_dir() else []
REPLAYED = [v for v in VECTORS if v.skip is None]
REJECTED = [v for v in REPLAYED if v.llhttp_error]
ACCEPTED = [v for v in REPLAYED if not v.llhttp_error]
pytestmark = pytest.mark.skipif(not VECTORS, reason=f"llhttp corpus not found at {CORPUS}")


def with_host(vector: Vector) -> bytes:
    """The vector with a Host field after each HTTP/1.1 request line llhttp saw begin, unless
    it names a Host already."""
    raw = vector.raw
    if re.search(rb"(?im)^host:", raw):
        return raw
    for start in reversed(vector.starts):
        line_end = raw.find(b"\r\n", start)
        if line_end > 0 and raw[start:line_end].endswith(b" HTTP/1.1"):
            raw = raw[: line_end + 2] + b"Host: corpus.test\r\n" + raw[line_end + 2 :]
    return raw


VARIANTS = {
    "as-is": lambda vector: vector.raw,
    "with-host": with_host,
    "completed": lambda vector: with_host(vector) + b"\r\n\r\n",
}


# The adapters alone


class Recorder:
    """A `ParserCallbacks` that only records what the adapter reports."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, str]] = []
        self.completed = 0

    def on_request(self, method, target, version, headers) -> None:
        self.requests.append((method, target, version))

    def on_body(self, data: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        self.completed += 1


@dataclass(frozen=True)
class ParserVerdict:
    completed: int  # messages completed before the end or the error
    error: int | None  # ParseError status


def parse(name: str, *pieces: bytes) -> ParserVerdict:
    """Feed `pieces` to a fresh adapter; what it completed and the status it raised."""
    recorder = Recorder()
    parser = parser_class(name)(recorder, Limits())
    try:
        for piece in pieces:
            parser.feed(piece)
    except ParseError as exc:
        return ParserVerdict(recorder.completed, exc.status)
    return ParserVerdict(recorder.completed, None)


# fulmen: an adapter under the real H1Connection


@dataclass(frozen=True)
class Outcome:
    served: tuple[tuple[str, bytes], ...]  # (method, raw path) of requests answered by the app
    errors: tuple[int, ...]  # statuses the server answered itself (rejections)
    closed: bool  # the server closed the connection (the client never did)

    @property
    def rejected(self) -> bool:
        return bool(self.errors)


def statuses(data: bytes) -> list[int]:
    """The statuses of the responses in `data` (each framed by Content-Length)."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        found.append(int(head[9:12]))
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        data = data[int(length[1]) if length else 0 :]
    return found


SETTLE = 20  # loop iterations for the apps to run; they wait only on receive() and send()


def recording_app(served: list[tuple[str, bytes]]) -> Any:
    async def app(scope, receive, send) -> None:
        """Reads the whole body, then answers 200 with an empty body."""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            if not message.get("more_body", False):
                break
        served.append((scope["method"], scope["raw_path"]))
        await send({"type": "http.response.start", "status": 200, "headers": EMPTY})
        await send({"type": "http.response.body", "body": b""})

    return app


corpus_app = recording_app([])


async def _replay(name: str, raw: bytes) -> Outcome:
    served: list[tuple[str, bytes]] = []
    app = recording_app(served)
    loop = asyncio.get_running_loop()
    # The vectors are about HTTP framing: their upgrade requests are not WebSocket handshakes.
    config = Config(app, http=name, access_log=False, proxy_headers=False, ws="none")
    state = ServerState(config, app, {}, loop)
    conn = H1Connection(state)
    transport = FakeTransport(loop, conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(raw)
    for _ in range(SETTLE):
        await asyncio.sleep(0)
    closed = transport.closing
    transport.close()  # the client leaves: an app still waiting for body gets a disconnect
    for _ in range(SETTLE):
        await asyncio.sleep(0)
    assert not state.tasks, "an app did not finish"
    errors = tuple(status for status in statuses(transport.written) if status != 200)
    assert len(served) + len(errors) == len(statuses(transport.written))
    return Outcome(tuple(served), errors, closed)


def replay(name: str, raw: bytes) -> Outcome:
    """Feed `raw` to a real `H1Connection` over parser `name` in one piece."""
    return asyncio.run(_replay(name, raw))


EMPTY = [(b"content-length", b"0")]


# Tests


def vector_params(vectors: list[Vector], marks: dict[str, str] | None = None) -> list[Any]:
    marks = marks or {}
    return [
        pytest.param(
            vector,
            id=vector.id,
            marks=[pytest.mark.xfail(strict=True, reason=marks[vector.section])]
            if vector.section in marks
            else [],
        )
        for vector in vectors
    ]


@pytest.mark.parametrize("vector", vector_params(REPLAYED))
def test_httptools_adapter_reproduces_llhttp(vector: Vector) -> None:
    verdict = parse("httptools", vector.raw)
    if vector.section in NOT_HTTP:
        assert verdict.error is not None
        assert verdict.completed == 0
        return
    assert (verdict.error is not None) == (vector.llhttp_error is not None), vector.llhttp_error
    assert verdict.completed == vector.llhttp_messages


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("vector", vector_params(REPLAYED, DIVERGENT))
def test_parsers_agree(vector: Vector, variant: str) -> None:
    """Both parsers give one answer: the same requests reach the app, the same statuses are
    answered, and the connection is closed or left waiting for more alike. A head is judged
    at its first bad byte by both (the h11 adapter checks the head as it arrives), so an
    input that ends inside a head gets the same answer too."""
    raw = VARIANTS[variant](vector)
    h11, httptools = replay("h11", raw), replay("httptools", raw)
    assert h11 == httptools, (h11, httptools)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("vector", vector_params(REJECTED))
def test_fulmen_rejects_what_llhttp_rejects(vector: Vector, variant: str) -> None:
    """No request llhttp (strict) refused reaches the app; completed, the connection ends.

    Requests llhttp completed before its error may be served (e.g. before data that follows
    `Connection: close`, which fulmen ignores: RFC 9112 §9.6).
    """
    raw = VARIANTS[variant](vector)
    for name in PARSERS:
        outcome = replay(name, raw)
        assert len(outcome.served) <= vector.llhttp_messages, (name, outcome)
        if variant == "completed":
            assert outcome.closed, (name, outcome)


@pytest.mark.parametrize("vector", vector_params(ACCEPTED))
def test_fulmen_serves_what_llhttp_accepts(vector: Vector) -> None:
    """With a Host field, every request llhttp accepts is served, unless STRICTER says why not."""
    for name in PARSERS:
        outcome = replay(name, with_host(vector))
        if vector.section in STRICTER and outcome.rejected:
            continue
        assert not outcome.rejected and len(outcome.served) == vector.llhttp_messages, (
            name,
            outcome,
        )


def test_the_corpus_is_all_accounted_for() -> None:
    """Every vector is replayed or skipped for a listed reason; the named ones exist."""
    assert len(REPLAYED) >= 100, len(REPLAYED)
    assert {v.skip for v in VECTORS} - {None} <= set(SKIP_REASONS)
    sections = {v.section for v in VECTORS}
    assert {section for _, section in OPEN_CHOICE} <= sections
    assert set(STRICTER) <= sections and set(DIVERGENT) <= sections
    assert all(v.starts for v in REPLAYED if v.llhttp_messages), "message begin not found"


# Through a real server

LOOPS = ("asyncio", "uvloop")
READ_TIMEOUT = 5.0  # far below the server's header timeout (60 s)


@pytest.fixture(scope="module", params=[(p, loop) for p in PARSERS for loop in LOOPS], ids=str)
def corpus_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """One real server per parser and loop for the whole corpus, with a header timeout far
    beyond the test's reading timeout: an answer that waits for it fails the test."""
    http, loop = request.param
    options = {
        "http": http,
        "ws": "none",
        "http2": False,  # (with HTTP/2, bytes that start `PRI ` are its preface: not parsed here)
        "log_level": "warning",
        "timeout_request_header": 60,
    }
    yield from start_server(corpus_app, loop, options)


def read_statuses(sock: socket.socket, count: int) -> tuple[list[int], bytes]:
    """`count` responses' statuses (Content-Length framed), and any bytes after them."""
    data = b""
    found: list[int] = []
    while len(found) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {found}: {data[:200]!r}"
            data += chunk
            continue
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data[:head_end])
        end = head_end + 4 + (int(length[1]) if length else 0)
        if len(data) < end:
            chunk = sock.recv(65536)
            assert chunk, f"closed inside a response: {data[:200]!r}"
            data += chunk
            continue
        found.append(int(data[9:12]))
        data = data[end:]
    return found, data


@pytest.mark.parametrize("variant", ["as-is", "with-host"])
def test_real_server_behaves_as_the_harness_predicts(
    corpus_server: RunningServer, variant: str
) -> None:
    """Every replayed vector, each on a connection of its own, sent whole with no end of stream
    after it: the statuses the harness predicts come, then the close if it predicts one. The
    prediction is httptools' for both parsers: they give one answer (`test_parsers_agree`)."""
    srv = corpus_server
    wrong = []
    for vector in REPLAYED:
        raw = VARIANTS[variant](vector)
        predicted = replay("httptools", raw)
        expected = [200] * len(predicted.served) + list(predicted.errors)
        with srv.connect() as sock:
            sock.settimeout(READ_TIMEOUT)
            sock.sendall(raw)
            try:
                statuses, rest = read_statuses(sock, len(expected))
                if predicted.closed:
                    while chunk := sock.recv(65536):
                        rest += chunk
                else:
                    # Close only once the server has the connection: asyncio fails to set up
                    # (and leaks) a transport whose peer is already gone when it accepts it.
                    poll_until(lambda: srv.server.state.connections, "connection not accepted")
            except (AssertionError, OSError) as exc:
                wrong.append((vector.id, expected, repr(exc)[:120]))
                continue
        if statuses != expected or rest:
            wrong.append((vector.id, expected, (statuses, rest[:80])))
    assert not wrong, wrong
