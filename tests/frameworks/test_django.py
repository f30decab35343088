"""Django under fulmen: the ASGI handler (sync and async views, request bodies, the ORM on
SQLite in a sync view, streaming over sync and async iterators, the 500 page), the WSGI handler
through `--interface wsgi`, and the ASGI app in real processes (gunicorn with the fulmen worker,
`fulmen --workers 2`), each through a real server and a real client
(tests/frameworks/apps_django.py).

Regression: fulmen once ran a request's first step outside any Task and resumed it in a Task
with a second copy of the context, so asgiref's `ThreadSensitiveContext` (entered by Django's
handler for every request) failed to reset its variable: `ValueError: <Token var=<ContextVar
name='thread_sensitive_context'>> was created in a different Context`, logged as "Exception in
ASGI application" on every request. The `*_log_no_app_error` tests catch it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import TIMEOUT, RunningServer
from tests.frameworks import apps_django
from tests.frameworks.apps_django import asgi_app, wsgi_app
from tests.helpers import Fulmen, Gunicorn

ServeApp = Callable[..., contextlib.AbstractContextManager[RunningServer]]

APP_ERROR = "Exception in ASGI application"
APP = "tests.frameworks.apps_django:asgi_app"
# Django's ASGI handler consumes a sync iterator whole (in a thread) and says so.
SYNC_ITERATOR_WARNING = "ignore:StreamingHttpResponse must consume synchronous iterators:Warning"


def assert_no_app_error(srv: RunningServer) -> None:
    """fulmen logged no error: no "Exception in ASGI application", no ValueError."""
    errors = srv.messages(logging.ERROR)
    assert errors == [], errors
    assert not any(record.exc_info for record in srv.records)


def stream_first_then_rest(client: httpx.Client, path: str) -> tuple[bytes, bytes]:
    """The first chunk of a gated stream (read before the gate opens) and the rest."""
    apps_django.GATE.clear()
    with client.stream("GET", path) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers
        chunks = response.iter_raw()
        first = next(chunks)
        apps_django.GATE.set()
        rest = b"".join(chunks)
    return first, rest


# -- the ASGI handler, in process ---------------------------------------------------------------


def test_sync_and_async_views_log_no_app_error(serve_app: ServeApp) -> None:
    with serve_app(asgi_app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        for _ in range(5):
            for view in ("sync", "async"):
                response = client.get(f"/{view}")
                assert response.status_code == 200
                assert response.json() == {"view": view, "pid": os.getpid()}
        assert_no_app_error(srv)


def test_fresh_connections_log_no_app_error(serve_app: ServeApp) -> None:
    with serve_app(asgi_app) as srv:
        for view in ("sync", "async") * 3:
            with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
                assert client.get(f"/{view}").status_code == 200
        assert_no_app_error(srv)


def test_post_echoes_a_large_body(serve_app: ServeApp) -> None:
    body = os.urandom(100 * 1024)
    with serve_app(asgi_app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        response = client.post("/echo", content=body)
        assert response.status_code == 200
        assert response.content == body
        assert_no_app_error(srv)


def test_orm_row_created_then_read_back(serve_app: ServeApp) -> None:
    text = f"note {os.urandom(4).hex()}"
    with serve_app(asgi_app) as srv:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
            created = client.post("/notes", content=text.encode())
            assert created.status_code == 200
            pk = created.json()["id"]
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:  # a new connection
            found = client.get(f"/notes/{pk}")
            assert found.status_code == 200
            assert found.json()["text"] == text
            assert client.get(f"/notes/{pk + 1000000}").status_code == 404
        assert_no_app_error(srv)


@pytest.mark.filterwarnings(SYNC_ITERATOR_WARNING)
def test_streaming_response_over_a_sync_iterator(serve_app: ServeApp) -> None:
    with serve_app(asgi_app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        response = client.get("/stream/sync", params={"gate": "0"})
        assert response.status_code == 200
        assert "content-length" not in response.headers
        assert response.content == b"first\nsecond\n"
        assert_no_app_error(srv)


def test_streaming_response_over_an_async_iterator(serve_app: ServeApp) -> None:
    with serve_app(asgi_app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        first, rest = stream_first_then_rest(client, "/stream/async")
        assert first == b"first\n"  # arrived while the iterator waited for it to be read
        assert rest == b"released\n"
        assert_no_app_error(srv)


def test_error_page_then_the_next_request(serve_app: ServeApp) -> None:
    with serve_app(asgi_app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        failed = client.get("/error")
        assert failed.status_code == 500
        assert "boom" not in failed.text  # DEBUG is off: no traceback to the client
        assert client.get("/sync").status_code == 200
        assert client.get("/async").status_code == 200
        assert_no_app_error(srv)  # Django handled the exception: fulmen has nothing to log


# -- the WSGI handler, in process ---------------------------------------------------------------


def test_wsgi_view_and_body(serve_app: ServeApp) -> None:
    body = os.urandom(100 * 1024)
    with (
        serve_app(wsgi_app, interface="wsgi") as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client,
    ):
        response = client.get("/sync")
        assert response.status_code == 200
        assert response.json() == {"view": "sync", "pid": os.getpid()}
        echoed = client.post("/echo", content=body)
        assert echoed.status_code == 200
        assert echoed.content == body


def test_wsgi_streaming_response(serve_app: ServeApp) -> None:
    with (
        serve_app(wsgi_app, interface="wsgi") as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client,
    ):
        first, rest = stream_first_then_rest(client, "/stream/sync")
        assert first == b"first\n"
        assert rest == b"released\n"


def test_wsgi_error_page_then_the_next_request(serve_app: ServeApp) -> None:
    with (
        serve_app(wsgi_app, interface="wsgi") as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client,
    ):
        assert client.get("/error").status_code == 500
        assert client.get("/sync").status_code == 200
        assert srv.messages(logging.ERROR) == []


# -- the ASGI app in real processes -------------------------------------------------------------


def exercise(url: str, count: int = 20) -> set[int]:
    """`count` requests, each on a new connection, over the sync and async views, the body echo
    and the error page; then a note stored and read back on one connection (one process, one
    database). The pids that answered."""
    pids: set[int] = set()
    for i in range(count):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            kind = i % 4
            if kind in (0, 1):
                view = "sync" if kind == 0 else "async"
                response = client.get(f"/{view}")
                assert response.status_code == 200
                assert response.json()["view"] == view
                pids.add(response.json()["pid"])
            elif kind == 2:
                body = os.urandom(64 * 1024)
                response = client.post("/echo", content=body)
                assert response.status_code == 200
                assert response.content == body
            else:
                assert client.get("/error").status_code == 500
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:  # keep-alive: one process
        created = client.post("/notes", content=b"across processes")
        assert created.status_code == 200
        found = client.get(f"/notes/{created.json()['id']}")
        assert found.status_code == 200
        assert found.json()["text"] == "across processes"
        assert found.json()["pid"] == created.json()["pid"]
    return pids


def test_under_gunicorn_with_two_workers_log_no_app_error() -> None:
    with Gunicorn(app=APP, workers=2) as server:
        pids = exercise(server.url)
        assert pids <= set(server.worker_pids())
        assert APP_ERROR not in server.stderr.text
        assert "thread_sensitive_context" not in server.stderr.text


def test_under_fulmen_workers_log_no_app_error() -> None:
    with Fulmen(APP, "--port", "0", "--workers", "2") as server:
        ready: set[int] = set()
        while len(ready) < 2:
            others = "".join(f"(?!{pid}\\])" for pid in ready)
            pattern = rf"Worker process \[{others}(\d+)\] is ready"
            ready.add(int(server.stderr.wait_for(pattern).group(1)))
        pids = exercise(server.url)
        assert pids <= ready
        assert APP_ERROR not in server.stderr.text
        assert not re.search("thread_sensitive_context|Traceback", server.stderr.text)
