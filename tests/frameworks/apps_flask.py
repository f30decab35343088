"""A Flask app for tests/frameworks/test_flask.py, served with `interface="wsgi"`.

`/echo` (POST) answers the request body; `/stream` streams `first\\n`, then, once a test set
`GATE` (or after 10 s), `released\\n` or `timed out\\n`, so a test can see the first chunk
arrive before the rest is produced; `/linger` answers `done` with a Content-Length, then
lingers (until `GATE` or 10 s) before its iterator ends, so the client has the whole response
while the app is still running; `/error` raises (Flask answers 500); `/hello` says hello.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from flask import Flask, Response, request, stream_with_context

GATE_TIMEOUT = 10.0
GATE = threading.Event()  # set by a test once it has read the first chunk of `/stream`

app = Flask(__name__)


@app.get("/hello")
def hello() -> str:
    return "hello from flask"


@app.post("/echo")
def echo() -> Response:
    return Response(request.get_data(), mimetype="application/octet-stream")


@app.get("/stream")
def stream() -> Response:
    name = request.args.get("name", "anonymous")  # stream_with_context keeps `request` usable

    def chunks() -> Iterator[bytes]:
        yield b"first\n"
        yield b"released\n" if GATE.wait(GATE_TIMEOUT) else b"timed out\n"
        yield f"bye {request.args.get('name', name)}\n".encode()

    return Response(stream_with_context(chunks()), mimetype="text/plain")


@app.get("/linger")
def linger() -> Response:
    def chunks() -> Iterator[bytes]:
        yield b"done"
        GATE.wait(GATE_TIMEOUT)

    return Response(chunks(), headers={"Content-Length": "4"}, mimetype="text/plain")


@app.get("/error")
def error() -> str:
    raise RuntimeError("boom from a Flask view")
