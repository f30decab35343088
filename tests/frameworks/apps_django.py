"""One Django project for the framework tests (test_django.py, test_channels.py).

Importing this module configures Django once per process and exposes `asgi_app` and `wsgi_app`.
Subprocess servers import it too: `tests.frameworks.apps_django:asgi_app`.

Views (each answers JSON with the pid of the process that served it, unless noted):
`/sync` and `/async`; `/echo` (POST: the request body back, raw); `/notes` (POST: stores the body
in SQLite, answers its id) and `/notes/<id>`; `/stream/sync` and `/stream/async` (a
`StreamingHttpResponse` over a sync or an async iterator: `first\\n`, then, once a test set
`GATE` or after 10 s, `released\\n` or `timed out\\n`; `/stream/sync?gate=0` never waits, for
Django's ASGI handler, which consumes a sync iterator whole before it sends anything); `/error`
raises (Django answers 500: DEBUG is off).

The SQLite database is a file (sync views run in threads: `:memory:` would not be shared), at
`$FRAMEWORKS_DJANGO_DB` or, by default, one per process in the temp dir, removed at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator

import django
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application
from django.db import connection, models
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path

GATE_TIMEOUT = 10.0
GATE = threading.Event()  # set by a test once it has read the first chunk of a stream

DB_PATH = os.environ.get("FRAMEWORKS_DJANGO_DB", "")


def _remove_db() -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(DB_PATH)


if not DB_PATH:  # this process's own database, removed when it exits
    DB_PATH = os.path.join(tempfile.gettempdir(), f"fulmen-django-{os.getpid()}.sqlite3")
    atexit.register(_remove_db)

if not settings.configured:
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="fulmen-tests-not-a-secret",
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DB_PATH}},
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        USE_TZ=True,
    )
    django.setup()


class Note(models.Model):
    text = models.TextField()

    class Meta:
        app_label = "fulmen_tests"


_table_lock = threading.Lock()
_table_ready = False


def _ensure_table() -> None:
    """Create the notes table on first use (in the view's thread, whose connection Django
    closes at the end of the request)."""
    global _table_ready
    with _table_lock:
        if _table_ready:
            return
        if Note._meta.db_table not in connection.introspection.table_names():
            with connection.schema_editor() as editor:
                editor.create_model(Note)
        _table_ready = True


def sync_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"view": "sync", "pid": os.getpid()})


async def async_view(request: HttpRequest) -> JsonResponse:
    await asyncio.sleep(0)  # a real suspension: the rest runs in a later step of the Task
    return JsonResponse({"view": "async", "pid": os.getpid()})


def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type="application/octet-stream")


def notes(request: HttpRequest) -> JsonResponse:
    _ensure_table()
    note = Note.objects.create(text=request.body.decode())
    return JsonResponse({"id": note.pk, "pid": os.getpid()})


def note(request: HttpRequest, pk: int) -> JsonResponse:
    _ensure_table()
    found = Note.objects.filter(pk=pk).first()
    if found is None:
        return JsonResponse({"error": "not found"}, status=404)
    return JsonResponse({"id": found.pk, "text": found.text, "pid": os.getpid()})


def _chunks(gate: bool) -> Iterator[bytes]:
    yield b"first\n"
    if gate:
        yield b"released\n" if GATE.wait(GATE_TIMEOUT) else b"timed out\n"
    else:
        yield b"second\n"


async def _async_chunks() -> AsyncIterator[bytes]:
    yield b"first\n"
    released = await asyncio.to_thread(GATE.wait, GATE_TIMEOUT)
    yield b"released\n" if released else b"timed out\n"


def stream_sync(request: HttpRequest) -> StreamingHttpResponse:
    gate = request.GET.get("gate", "1") == "1"
    return StreamingHttpResponse(_chunks(gate), content_type="text/plain")


async def stream_async(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(_async_chunks(), content_type="text/plain")


def error(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom from a Django view")


urlpatterns = [
    path("sync", sync_view),
    path("async", async_view),
    path("echo", echo),
    path("notes", notes),
    path("notes/<int:pk>", note),
    path("stream/sync", stream_sync),
    path("stream/async", stream_async),
    path("error", error),
]

asgi_app = get_asgi_application()
wsgi_app = get_wsgi_application()
