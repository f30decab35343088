"""Logging: the startup line, access lines, colours and levels."""

from __future__ import annotations

import logging
import socket
import sys

import click
import httpx
import pytest

from fulmen.logging import (
    LOG_LEVELS,
    TRACE_LEVEL,
    AccessFormatter,
    ColourFormatter,
    configure_logging,
)
from fulmen.protocols.wire import status_text
from tests.conftest import TIMEOUT, recv_response
from tests.helpers import Fulmen

GREEN_INFO = click.style("INFO", fg="green")


@pytest.mark.parametrize("colours", ["--use-colors", "--no-use-colors", None])
def test_startup_and_access_lines(colours) -> None:
    args = [colours] if colours else []
    with Fulmen("tests.apps:app", "--port", "0", "--lifespan", "off", *args) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /path?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_response(sock).startswith(b"HTTP/1.1 200 ")
            client = f"127.0.0.1:{sock.getsockname()[1]}"
        server.signal()
        assert server.wait() == 0
    startup = f"Fulmen running on http://127.0.0.1:{server.port} (Press CTRL+C to quit)"
    access = f'{client} - "GET /path?q=1 HTTP/1.1" '
    if colours == "--use-colors":
        assert f"{GREEN_INFO}:     {startup}" in server.stderr.lines
        assert server.stdout.lines == [
            f"{GREEN_INFO}:     {access}{click.style('200 OK', fg='green')}"
        ]
    else:  # not a TTY: no colours unless asked for
        assert f"INFO:     {startup}" in server.stderr.lines
        assert server.stdout.lines == [f"INFO:     {access}200 OK"]
        assert "\x1b" not in server.stderr.text + server.stdout.text


async def not_found(scope, receive, send):
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("access_log", [True, False])
def test_access_record(access_log, serve) -> None:
    with serve(not_found, access_log=access_log) as srv, srv.connect() as sock:
        sock.sendall(b"GET /missing?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(sock).startswith(b"HTTP/1.1 404 ")
        port = sock.getsockname()[1]
        sock.sendall(b"GET /%1B[31mred%7F HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(sock).startswith(b"HTTP/1.1 404 ")
    records = [r for r in srv.records if r.name == "fulmen.access"]
    if not access_log:
        assert records == []
        return
    assert [r.getMessage() for r in records] == [
        f'127.0.0.1:{port} - "GET /missing?x=1 HTTP/1.1" 404 Not Found',
        # control bytes escaped
        f'127.0.0.1:{port} - "GET /\\x1b[31mred\\x7f HTTP/1.1" 404 Not Found',
    ]
    assert [r.status_code for r in records] == [404, 404]
    assert {r.levelno for r in records} == {logging.INFO}


def test_log_level_warning_silences_info(serve_one) -> None:
    with serve_one(not_found, log_level="warning") as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).status_code == 404
        with srv.connect() as sock:
            sock.sendall(b"NOT HTTP\r\n\r\n")
            assert recv_response(sock).startswith(b"HTTP/1.1 400 ")
    assert [r for r in srv.records if r.levelno < logging.WARNING] == []


def test_log_level_debug_shows_debug_records(serve_one) -> None:
    with serve_one(not_found, log_level="debug") as srv, srv.connect() as sock:
        sock.sendall(b"NOT HTTP\r\n\r\n")
        assert recv_response(sock).startswith(b"HTTP/1.1 400 ")
    debug = [r.getMessage() for r in srv.records if r.levelno == logging.DEBUG]
    assert any(message.startswith("Rejected request (400)") for message in debug)


@pytest.mark.parametrize("level", LOG_LEVELS)
def test_configure_logging_levels(level) -> None:
    try:
        configure_logging(level, access_log=True, use_colors=False)
        for name in ("fulmen", "fulmen.error", "fulmen.access"):
            assert logging.getLogger(name).level == LOG_LEVELS[level]
    finally:
        configure_logging("info", access_log=True, use_colors=False)


def test_trace_level() -> None:
    assert LOG_LEVELS["trace"] == TRACE_LEVEL == 5
    assert logging.getLevelName(TRACE_LEVEL) == "TRACE"


def test_configure_logging_without_access_log() -> None:
    try:
        configure_logging("debug", access_log=False, use_colors=None)
        access = logging.getLogger("fulmen.access")
        assert not access.isEnabledFor(logging.CRITICAL)
        assert access.handlers == []
    finally:
        configure_logging("info", access_log=True, use_colors=False)


def make_record(level: int, message: str, status: int | None = None) -> logging.LogRecord:
    record = logging.LogRecord("fulmen.error", level, __file__, 1, message, None, None)
    if status is not None:
        record.status_code = status
    return record


@pytest.mark.parametrize(
    ("level", "colour", "prefix"),
    [
        (TRACE_LEVEL, "blue", "TRACE:    "),
        (logging.DEBUG, "cyan", "DEBUG:    "),
        (logging.INFO, "green", "INFO:     "),
        (logging.WARNING, "yellow", "WARNING:  "),
        (logging.ERROR, "red", "ERROR:    "),
        (logging.CRITICAL, "bright_red", "CRITICAL: "),
    ],
)
def test_level_prefix(level, colour, prefix) -> None:
    plain = ColourFormatter("%(levelprefix)s %(message)s", use_colors=False)
    coloured = ColourFormatter("%(levelprefix)s %(message)s", use_colors=True)
    record = make_record(level, "hello")
    assert plain.format(record) == f"{prefix}hello"
    name, _, pad = prefix.partition(":")
    assert coloured.format(record) == f"{click.style(name, fg=colour)}:{pad}hello"
    assert record.levelname == name  # the record itself is not modified


@pytest.mark.parametrize(
    ("status", "colour"),
    [(101, "bright_white"), (204, "green"), (301, "yellow"), (404, "red"), (503, "bright_red")],
)
def test_access_status_colour(status, colour) -> None:
    coloured = AccessFormatter("%(message)s", use_colors=True)
    plain = AccessFormatter("%(message)s", use_colors=False)
    text = status_text(status)  # `404 Not Found`: the status is coloured with its phrase
    message = f'127.0.0.1:5000 - "GET / HTTP/1.1" {text}'
    record = make_record(logging.INFO, message, status)
    assert coloured.format(record) == message[: -len(text)] + click.style(text, fg=colour)
    assert plain.format(record) == message


def test_colours_default_to_whether_stderr_is_a_tty() -> None:
    assert ColourFormatter().use_colors == sys.stderr.isatty()
