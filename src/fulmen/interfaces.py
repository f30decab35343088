"""Detect the application interface once, and adapt ASGI2 and WSGI apps to ASGI3."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import io
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fulmen.consumers import ConsumerMiddleware
from fulmen.types import ASGIApp, Message, Receive, Scope, Send

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def detect_interface(app: Any) -> str:
    """'asgi3' for `async def app(scope, receive, send)`, 'asgi2' for `app(scope)`.

    'consumer' for `async def app(message, channels)`: exactly two positional parameters.
    """
    if inspect.isclass(app):
        return "asgi3" if hasattr(app, "__await__") else "asgi2"
    # `app` itself first: this also sees through functools.partial of an async function.
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(app.__call__):
        return "consumer" if _positional(app) == 2 else "asgi3"
    return "asgi2"


def _positional(app: Any) -> int | None:
    """How many positional parameters `app` has; None when that cannot be told."""
    try:
        parameters = inspect.signature(app).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in positional)


def adapt(app: Any, interface: str) -> ASGIApp:
    """Return an ASGI3 callable for `app` served through `interface`."""
    if interface == "auto":
        interface = detect_interface(app)
    if interface == "wsgi":
        return WSGIMiddleware(app)
    if interface == "asgi2":
        return ASGI2Middleware(app)
    if interface == "consumer":
        asynchronous = inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(app.__call__)
        return ConsumerMiddleware(app, asynchronous)
    return app  # type: ignore[no-any-return]


class ASGI2Middleware:
    """Run an ASGI2 'double callable' application as ASGI3."""

    def __init__(self, app: Callable[[Scope], Any]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        instance = self.app(scope)
        await instance(receive, send)


class WSGIMiddleware:
    """Serve a PEP 3333 application as ASGI3.

    The WSGI application runs in a thread pool, so it never blocks the event loop; the request
    body is streamed into `wsgi.input` and the response streamed out chunk by chunk.
    """

    def __init__(self, app: WSGIApp, workers: int = 10) -> None:
        self.app = app
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fulmen-wsgi")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                raise RuntimeError("WSGI applications do not support the lifespan protocol")
            raise RuntimeError(f"WSGI cannot serve scope type {scope['type']!r}")
        loop = asyncio.get_running_loop()
        call = _WSGICall(self.app, scope, receive, send, loop)
        # In a copy of the request's context, as `asyncio.to_thread` runs a function.
        await loop.run_in_executor(self.executor, contextvars.copy_context().run, call.run)


class _WSGIInput(io.RawIOBase):
    """Raw `wsgi.input`: reads ASGI `http.request` messages on demand (wrapped buffered)."""

    def __init__(self, receive: Callable[[], Message]) -> None:
        self._receive = receive
        self._pending = b""
        self._more = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending and self._more:
            message = self._receive()
            if message["type"] != "http.request":
                self._more = False
                break
            self._pending = message.get("body", b"")
            self._more = message.get("more_body", False)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


class _WSGICall:
    """One WSGI request, run entirely inside a worker thread."""

    def __init__(
        self,
        app: WSGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.app = app
        self.scope = scope
        self.receive = receive
        self.send = send
        self.loop = loop
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = False

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _send(self, message: Message) -> None:
        self._call(self.send(message))

    def _receive(self) -> Message:
        result: Message = self._call(self.receive())
        return result

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and self.started:
            raise exc_info[1].with_traceback(exc_info[2])
        if self.status is not None and exc_info is None:
            raise RuntimeError("start_response called twice without exc_info")
        self.status = int(status.split(" ", 1)[0])
        self.headers = [
            (name.strip().lower().encode("latin-1"), value.strip().encode("latin-1"))
            for name, value in headers
        ]
        return self.write

    def write(self, data: bytes) -> None:
        if self.status is None:
            raise RuntimeError("write() called before start_response()")
        if not self.started:
            self.started = True
            self._send(
                {"type": "http.response.start", "status": self.status, "headers": self.headers}
            )
        if data:
            self._send({"type": "http.response.body", "body": data, "more_body": True})

    def run(self) -> None:
        environ = build_environ(self.scope, _WSGIInput(self._receive))
        result = self.app(environ, self.start_response)
        last = b""
        try:
            if isinstance(result, (list, tuple)) and len(result) == 1:
                # PEP 3333: a one-block response may be sent with a Content-Length.
                last = result[0]
            else:
                for chunk in result:
                    if chunk:
                        self.write(chunk)
            self.write(b"")
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        self._send({"type": "http.response.body", "body": last, "more_body": False})


def build_environ(scope: Scope, body: io.RawIOBase) -> dict[str, Any]:
    """The PEP 3333 environ for an ASGI HTTP scope: native strings for CGI values."""
    script_name = scope.get("root_path", "")
    path = scope["path"]
    if script_name and path.startswith(script_name):
        path = path[len(script_name) :]
    server = scope.get("server") or ("localhost", 80)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": script_name.encode("utf-8").decode("latin-1"),
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]) if server[1] is not None else "0",
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BufferedReader(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        # `wsgi.input` ends where the body ends, also a chunked one without Content-Length
        # (the extension gunicorn and mod_wsgi set; Werkzeug reads no such body without it).
        "wsgi.input_terminated": True,
    }
    client = scope.get("client")
    if client:
        environ["REMOTE_ADDR"] = str(client[0])
        environ["REMOTE_PORT"] = str(client[1])
    for name, value in scope["headers"]:
        key = name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = text
            continue
        key = f"HTTP_{key}"
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    return environ
