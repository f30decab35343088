"""What the server does when the application misbehaves: exceptions, missing or out-of-order
messages, invalid response headers and Content-Length mismatches.

A broken response is answered with a 500 while nothing has been written yet, otherwise the
connection is closed so the client cannot take a truncated body for a whole one. Either way the
error is logged on `fulmen.error` and the server goes on serving.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.protocols.http1_raw import Reader, read_body, request, respond


class AppError(Exception):
    pass


START = {"type": "http.response.start", "status": 200, "headers": []}


def start_with(*headers: tuple[bytes, bytes]) -> dict:
    return {**START, "headers": list(headers)}


def body(data: bytes, more_body: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more_body}


# What each faulty app sends, by path; `raise` marks where it raises AppError.
RAISE = object()
FAULTS: dict[str, list] = {
    "/raise-before-start": [RAISE],
    "/raise-after-start": [START, RAISE],
    "/no-response": [],
    "/start-only": [START],
    "/body-before-start": [body(b"early")],
    "/unknown-first": [{"type": "http.response.bogus"}],
    "/unknown-after-start": [START, {"type": "http.response.bogus"}],
    "/header-name-space": [start_with((b"x bad", b"v")), body(b"x")],
    "/header-name-colon": [start_with((b"x-bad:", b"v")), body(b"x")],
    "/header-value-crlf": [start_with((b"x-a", b"v\r\nx-injected: 1")), body(b"x")],
    "/header-value-lf": [start_with((b"x-a", b"v\nx-injected: 1")), body(b"x")],
    "/header-value-cr": [start_with((b"x-a", b"v\rx-injected: 1")), body(b"x")],
    "/header-name-crlf": [start_with((b"x-a\r\nx-injected", b"1")), body(b"x")],
    "/length-longer": [start_with((b"content-length", b"3")), body(b"12345")],
    "/length-shorter": [start_with((b"content-length", b"10")), body(b"12345")],
    # The head and part of the body are on the wire when these break:
    "/raise-mid-body": [START, body(b"part", True), RAISE],
    "/return-mid-body": [START, body(b"part", True)],
    "/start-twice": [START, body(b"part", True), START],
    "/length-longer-streamed": [
        start_with((b"content-length", b"10")),
        body(b"12345", True),
        body(b"123456"),
    ],
    "/length-shorter-streamed": [
        start_with((b"content-length", b"10")),
        body(b"12345", True),
        body(b""),
    ],
}


async def faulty_app(scope, receive, send) -> None:
    await read_body(receive)
    if scope["path"] == "/ok":
        await respond(send, b"still serving")
        return
    for message in FAULTS[scope["path"]]:
        if message is RAISE:
            raise AppError(f"boom at {scope['path']}")
        await send(message)


EXCEPTION = "Exception in ASGI application"
NO_RESPONSE = "ASGI callable returned without sending a response."
INCOMPLETE = "ASGI callable returned without completing the response."

# path -> (logged message, exception type in exc_info or None, text in the exception)
ANSWERED_500 = {
    "/raise-before-start": (EXCEPTION, AppError, "boom"),
    "/raise-after-start": (EXCEPTION, AppError, "boom"),
    "/no-response": (NO_RESPONSE, None, ""),
    "/start-only": (NO_RESPONSE, None, ""),
    "/body-before-start": (EXCEPTION, RuntimeError, "http.response.start"),
    "/unknown-first": (EXCEPTION, RuntimeError, "http.response.bogus"),
    "/unknown-after-start": (EXCEPTION, RuntimeError, "http.response.bogus"),
    "/header-name-space": (EXCEPTION, RuntimeError, "header name"),
    "/header-name-colon": (EXCEPTION, RuntimeError, "header name"),
    "/header-value-crlf": (EXCEPTION, RuntimeError, "header value"),
    "/header-value-lf": (EXCEPTION, RuntimeError, "header value"),
    "/header-value-cr": (EXCEPTION, RuntimeError, "header value"),
    "/header-name-crlf": (EXCEPTION, RuntimeError, "header name"),
}
# path -> (logged message, exception type, text, exact bytes of the body sent before the close)
CLOSED = {
    "/raise-mid-body": (EXCEPTION, AppError, "boom", b"4\r\npart\r\n"),
    "/return-mid-body": (INCOMPLETE, None, "", b"4\r\npart\r\n"),
    "/start-twice": (EXCEPTION, RuntimeError, "http.response.start", b"4\r\npart\r\n"),
    "/length-longer-streamed": (EXCEPTION, RuntimeError, "Content-Length", b"12345"),
    "/length-shorter-streamed": (EXCEPTION, RuntimeError, "Content-Length", b"12345"),
}


def assert_logged(srv, message: str, exc_type: type | None, text: str) -> None:
    # The fixture's handler sits on "fulmen" and on "fulmen.error", which propagates to
    # "fulmen": each record arrives twice, as the same object.
    records = list({id(r): r for r in srv.records}.values())
    errors = [r for r in records if r.name == "fulmen.error" and r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [message]
    record = errors[0]
    if exc_type is None:
        assert not record.exc_info
    else:
        assert record.exc_info and record.exc_info[0] is exc_type
        assert text in str(record.exc_info[1])
        assert record.exc_info[2] is not None  # the traceback is there to be printed


def assert_still_serving(srv) -> None:
    response = httpx.get(f"{srv.url}/ok")
    assert response.status_code == 200
    assert response.text == "still serving"


@pytest.mark.parametrize("path", list(ANSWERED_500))
def test_failure_before_response_is_500(serve, path: str) -> None:
    message, exc_type, text = ANSWERED_500[path]
    with serve(faulty_app) as srv:
        with srv.connect() as sock:
            reader = Reader(sock)
            sock.sendall(request(path=path))
            response = reader.response()
            assert response.status == 500
            assert response.get("content-length") == str(len(response.body))
            assert response.body == b"Internal Server Error"
            assert response.get("connection") == "close"
            assert reader.closed()
            # Nothing the app put in its headers reaches the wire.
            assert b"x-bad" not in response.head and b"injected" not in response.head
        assert_logged(srv, message, exc_type, text)
        assert_still_serving(srv)


@pytest.mark.parametrize("path", list(CLOSED))
def test_failure_mid_response_closes_connection(serve, path: str) -> None:
    message, exc_type, text, partial = CLOSED[path]
    with serve(faulty_app) as srv:
        with srv.connect() as sock:
            reader = Reader(sock)
            sock.sendall(request(path=path) + request(path="/ok"))
            response = reader.head()
            assert response.status == 200
            # The body stops short (no last chunk, fewer bytes than declared): then the close.
            assert reader.until_closed() == partial
        assert_logged(srv, message, exc_type, text)
        assert_still_serving(srv)


@pytest.mark.parametrize("path", ["/length-longer", "/length-shorter"])
def test_content_length_mismatch_in_whole_body(serve, path: str) -> None:
    with serve(faulty_app) as srv:
        with srv.connect() as sock:
            sock.sendall(request(path=path) + request(path="/ok"))
            data = Reader(sock).until_closed()
        # Nothing was written yet: a 500 or a bare close, never the app's wrong framing.
        assert data == b"" or data.startswith(b"HTTP/1.1 500 "), data
        assert b"12345" not in data
        assert_logged(srv, EXCEPTION, RuntimeError, "Content-Length")
        assert_still_serving(srv)
