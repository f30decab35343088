"""Adapters between the two Python web server interfaces.

- `ASGIAdapter(wsgi_app)`: a PEP 3333 (WSGI) application as an ASGI 3 application; the very
  machinery fulmen uses for `--interface wsgi`.
- `WSGIAdapter(asgi_app)`: an ASGI 3 application as a WSGI application, for any WSGI server
  (gunicorn's sync worker, mod_wsgi, uWSGI, `wsgiref`).

`WSGIAdapter` runs the ASGI application on one event loop per adapter, in a background thread
started on the first request (and again in a forked child, whose parent's thread did not follow
it). The WSGI server's thread and the application's task meet through a thread-safe queue per
request: the request thread reads `wsgi.input` one chunk each time the application asks for
more body, and yields each `http.response.body` message to the WSGI server as it comes.
"""

from __future__ import annotations

import asyncio
import http
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fulmen.interfaces import WSGIMiddleware
from fulmen.lifespan import Lifespan
from fulmen.types import ASGIApp, Message, Scope

__all__ = ["ASGIAdapter", "WSGIAdapter", "build_scope"]

logger = logging.getLogger("fulmen.error")

StartResponse = Callable[..., Any]


class ASGIAdapter(WSGIMiddleware):
    """Serve a PEP 3333 (WSGI) application as an ASGI 3 application.

    This is the adapter behind fulmen's `--interface wsgi`, under a public name for other ASGI
    servers (or for mounting a WSGI app inside an ASGI one): `ASGIAdapter(wsgi_app, workers=10)`.
    The WSGI application runs in a pool of `workers` threads so it never blocks the event loop;
    the request body is streamed into `wsgi.input` and the response streamed out chunk by chunk.
    Only `http` scopes are served: a `lifespan` or `websocket` scope raises `RuntimeError`.
    """


# RFC 9110 §7.6.1: connection-specific fields belong to the WSGI server, which frames the
# response itself; PEP 3333 forbids an application to send them.
_HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    )
)
_ERROR_500 = b"Internal Server Error"
_ERROR_HEADERS = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Content-Length", str(len(_ERROR_500))),
]
_ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
_DISCONNECT: Message = {"type": "http.disconnect"}


class WSGIAdapter:
    """Serve an ASGI 3 application from any WSGI server.

    `chunk_size` bounds each `http.request` body message (the body is read from `wsgi.input`
    only as the application calls `receive()`). Call `startup()` once the process will serve
    (e.g. from gunicorn's `post_worker_init` hook) to run the application's lifespan startup,
    and `shutdown()` at exit (e.g. `worker_exit`) to run its lifespan shutdown and stop the
    event loop thread; without them, no lifespan event is sent.
    """

    def __init__(self, app: ASGIApp, *, chunk_size: int = 64 * 1024) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.app = app
        self.chunk_size = chunk_size
        self.state: dict[str, Any] = {}  # the lifespan state; each request gets a copy
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lifespan: Lifespan | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong references (loop thread only)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        loop = self._event_loop()
        exchange = _Exchange(environ, loop, self.chunk_size)
        scope = build_scope(environ, self.state)
        loop.call_soon_threadsafe(self._start_task, exchange, scope)
        return exchange.respond(start_response)

    def _start_task(self, exchange: _Exchange, scope: Scope) -> None:
        task = asyncio.get_running_loop().create_task(exchange.run(self.app, scope))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_run_forever, args=(loop,), name="fulmen-wsgi-adapter", daemon=True
                )
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                self._lifespan = None
            return self._loop

    def startup(self) -> None:
        """Run the application's lifespan startup on the adapter's loop, as `--lifespan auto`
        does: an application without lifespan support is served anyway. Raises `RuntimeError`
        if the application reports a failed startup."""
        loop = self._event_loop()

        async def start() -> Lifespan:
            lifespan = Lifespan(self.app, "auto", self.state)
            await lifespan.startup()
            return lifespan

        lifespan = asyncio.run_coroutine_threadsafe(start(), loop).result()
        if lifespan.startup_failed:
            raise RuntimeError("ASGI application startup failed")
        with self._lock:
            self._lifespan = lifespan

    def shutdown(self) -> None:
        """Run the lifespan shutdown (if `startup()` ran), cancel the requests still running,
        and stop the event loop thread. A later request starts a new loop."""
        with self._lock:
            loop, thread, lifespan = self._loop, self._thread, self._lifespan
            self._loop = self._thread = self._lifespan = None
        if loop is None or thread is None:
            return

        async def stop() -> None:
            if lifespan is not None:
                await lifespan.shutdown()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()

        asyncio.run_coroutine_threadsafe(stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _settle(future: asyncio.Future[Any] | None, result: Any, error: BaseException | None) -> None:
    """On the loop: complete `future` unless its waiter was cancelled meanwhile."""
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# Events from the application's task to the request thread: (kind, payload, future).
_Event = tuple[str, Any, "asyncio.Future[Any] | None"]


class _Exchange:
    """One request: the WSGI server's thread on one side, the application's task on the other.

    Only `receive()`, `send()` and `run()` run on the loop; everything else runs in the request
    thread. `closed` (under `lock`) tells the task that the request thread no longer listens:
    the response completed, or the WSGI server closed the iterable early (a disconnect).
    """

    def __init__(
        self, environ: dict[str, Any], loop: asyncio.AbstractEventLoop, chunk_size: int
    ) -> None:
        self.loop = loop
        self.input = environ["wsgi.input"]
        self.chunk_size = chunk_size
        self.remaining = _body_length(environ)  # None: read until EOF
        self.body_done = False
        self.events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.closed = False
        self.complete = False
        self.parked: list[asyncio.Future[Any]] = []  # receive() after the body: until the end

    # On the loop

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self.receive, self.send)
        except BaseException as exc:  # the task ends here: nothing above it to re-raise to
            with self.lock:
                if not self.closed:
                    self.events.put(("error", exc, None))
                    return
            if not isinstance(exc, asyncio.CancelledError):
                logger.error("Exception in ASGI application", exc_info=exc)
        else:
            with self.lock:
                if not self.closed:
                    self.events.put(("done", None, None))

    async def receive(self) -> Message:
        future: asyncio.Future[Message] = self.loop.create_future()
        with self.lock:
            if self.closed:
                return dict(_DISCONNECT)
            self.events.put(("receive", None, future))
        return await future

    async def send(self, message: Message) -> None:
        future: asyncio.Future[None] = self.loop.create_future()
        with self.lock:
            if self.complete:
                raise RuntimeError(
                    f"Unexpected ASGI message {message['type']!r} after the response"
                )
            if self.closed:
                return  # the client left: nothing to send to (as fulmen's own HTTP cycle)
            self.events.put(("send", message, future))
        await future

    # In the request thread

    def _reply(self, future: asyncio.Future[Any] | None, result: Any = None) -> None:
        self.loop.call_soon_threadsafe(_settle, future, result, None)

    def _refuse(self, future: asyncio.Future[Any] | None, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, future, None, error)

    def _next(self) -> _Event:
        """The application's next `send` or its end, answering its `receive`s meanwhile."""
        while True:
            event = self.events.get()
            if event[0] != "receive":
                return event
            self._read(event[2])

    def _read(self, future: asyncio.Future[Any] | None) -> None:
        if self.body_done:
            assert future is not None
            self.parked.append(future)  # ASGI: waits until the response is done or a disconnect
            return
        remaining = self.remaining
        size = self.chunk_size if remaining is None else min(self.chunk_size, remaining)
        try:
            data = bytes(self.input.read(size)) if size else b""
        except Exception:  # a broken body (client gone, bad chunking) ends it
            self.body_done = True
            self._reply(future, dict(_DISCONNECT))
            return
        more = bool(data)
        if remaining is not None:
            self.remaining = remaining = remaining - len(data)
            more = more and remaining > 0
        self.body_done = not more
        self._reply(future, {"type": "http.request", "body": data, "more_body": more})

    def respond(self, start_response: StartResponse) -> Iterable[bytes]:
        """Wait for the head and the first body message (WSGI needs both at once), then
        call `start_response` and return the streaming iterable."""
        head: tuple[str, list[tuple[str, str]]] | None = None
        while True:
            kind, message, future = self._next()
            if kind == "error":
                logger.error("Exception in ASGI application", exc_info=message)
                return self._error(start_response)
            if kind == "done":
                logger.error("ASGI callable returned without sending a response.")
                return self._error(start_response)
            kind = message.get("type")
            expected = "http.response.start" if head is None else "http.response.body"
            if kind != expected:
                self._refuse(future, RuntimeError(f"Expected {expected!r}, got {kind!r}"))
                continue
            if head is None:
                try:
                    head = _head(message)
                except Exception as exc:  # the app's send() raises it
                    self._refuse(future, exc)
                    continue
                self._reply(future)
                continue
            self._reply(future)
            try:
                start_response(*head)
            except BaseException:
                self._end(complete=False)
                raise
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if not more:
                self._end(complete=True)
            return _Response(self, body, more)

    def _error(self, start_response: StartResponse) -> list[bytes]:
        self._end(complete=False)
        start_response("500 Internal Server Error", list(_ERROR_HEADERS))
        return [_ERROR_500]

    def next_body(self) -> tuple[bytes, bool]:
        """The next non-empty body chunk and whether more follow; raises if the app failed."""
        while True:
            kind, message, future = self._next()
            if kind == "error":
                self._end(complete=False)
                raise message
            if kind == "done":
                self._end(complete=False)
                raise RuntimeError("ASGI callable returned without completing the response.")
            if message.get("type") != "http.response.body":
                error = RuntimeError(f"Unexpected ASGI message {message.get('type')!r}")
                self._refuse(future, error)
                continue
            self._reply(future)
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if not more:
                self._end(complete=True)
            if body or not more:
                return body, more

    def _end(self, complete: bool) -> None:
        """The request thread stops listening: answer every waiting message."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.complete = complete
        while True:
            try:
                kind, message, future = self.events.get_nowait()
            except queue.Empty:
                break
            if kind == "receive":
                self.parked.append(future)  # type: ignore[arg-type]
            elif kind == "send":
                self._reply(future)  # the client left: dropped, as after a disconnect
            elif kind == "error" and not isinstance(message, asyncio.CancelledError):
                logger.error("Exception in ASGI application", exc_info=message)
        for parked in self.parked:
            self._reply(parked, dict(_DISCONNECT))
        self.parked.clear()


class _Response:
    """The WSGI response iterable: the first body chunk, then each one as the app sends it;
    `close()` before the end tells the application the client is gone (`http.disconnect`)."""

    def __init__(self, exchange: _Exchange, first: bytes, more: bool) -> None:
        self.exchange = exchange
        self.first: bytes | None = first  # yielded even if empty: it sends the held head
        self.more = more

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.first is not None:
            first, self.first = self.first, None
            return first
        if not self.more:
            raise StopIteration
        body, self.more = self.exchange.next_body()
        if not body:
            raise StopIteration
        return body

    def close(self) -> None:
        self.more = False
        self.exchange._end(complete=False)


def _body_length(environ: dict[str, Any]) -> int | None:
    """How much `wsgi.input` holds: CONTENT_LENGTH, else to EOF if the server says the input
    is terminated (chunked bodies), else nothing (PEP 3333: reading more may block)."""
    length = environ.get("CONTENT_LENGTH", "")
    if length:
        try:
            return max(int(length), 0)
        except ValueError:
            return 0
    return None if environ.get("wsgi.input_terminated") else 0


def _head(message: Message) -> tuple[str, list[tuple[str, str]]]:
    """The WSGI status line and headers of `http.response.start`, without the hop-by-hop
    headers (the WSGI server frames the response itself)."""
    status = int(message["status"])
    if not 100 <= status <= 999:
        raise RuntimeError(f"Invalid HTTP status {status}")
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    headers = [
        (bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
        for name, value in message.get("headers", ())
        if bytes(name).lower() not in _HOP_BY_HOP
    ]
    return f"{status} {phrase}", headers


def _text(value: str) -> str:
    """A WSGI 'bytes as latin-1' string as the UTF-8 text it carries (ASGI paths are text)."""
    return value.encode("latin-1").decode("utf-8", "replace")


_HTTP_VERSIONS = {"HTTP/1.0": "1.0", "HTTP/1.1": "1.1", "HTTP/2": "2", "HTTP/2.0": "2"}


def build_scope(environ: dict[str, Any], state: dict[str, Any] | None = None) -> Scope:
    """The ASGI `http` scope for a PEP 3333 environ.

    `root_path` is SCRIPT_NAME, and `path` is SCRIPT_NAME + PATH_INFO (ASGI: the path includes
    the root path). `raw_path` is the request target as sent when the server gives it
    (gunicorn's RAW_URI, uWSGI's REQUEST_URI), else None. Headers come from CONTENT_TYPE,
    CONTENT_LENGTH and the HTTP_* variables: a WSGI server has already joined repeated headers
    with commas and turned `-` into `_`, which cannot be undone.
    """
    script_name = _text(environ.get("SCRIPT_NAME", ""))
    headers: list[tuple[bytes, bytes]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                continue  # CGI puts them in CONTENT_TYPE / CONTENT_LENGTH
            name = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            name = key
        else:
            continue
        headers.append((name.replace("_", "-").lower().encode("latin-1"), value.encode("latin-1")))
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    port = str(environ.get("SERVER_PORT", ""))
    client = None
    if environ.get("REMOTE_ADDR"):
        remote_port = str(environ.get("REMOTE_PORT", ""))
        client = (environ["REMOTE_ADDR"], int(remote_port) if remote_port.isdigit() else 0)
    return {
        "type": "http",
        "asgi": _ASGI_VERSION,
        "http_version": _HTTP_VERSIONS.get(environ.get("SERVER_PROTOCOL", ""), "1.1"),
        "method": environ["REQUEST_METHOD"],
        "scheme": environ.get("wsgi.url_scheme", "http"),
        "path": script_name + _text(environ.get("PATH_INFO", "")),
        "raw_path": (
            raw_uri.split("?", 1)[0].encode("latin-1") if raw_uri.startswith("/") else None
        ),
        "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
        "root_path": script_name,
        "headers": headers,
        "server": (environ.get("SERVER_NAME", ""), int(port) if port.isdigit() else None),
        "client": client,
        "state": dict(state or {}),
    }
