"""`--http3` with `--workers N` and under gunicorn: each worker process binds its own UDP socket
on the port (SO_REUSEPORT), and every HTTP/3 connection is served whole by one of them."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from tests.conftest import Certs
from tests.helpers import Fulmen, Gunicorn
from tests.protocols.h3client import connect, run
from tests.test_workers import APP, ready_pids


def test_workers_serve_http3(certs: Certs) -> None:
    tls = ("--ssl-certfile", certs.cert, "--ssl-keyfile", certs.key, "--http3")
    with Fulmen(APP, "--port", "0", "--workers", "2", *tls) as server:
        pids = ready_pids(server, 2)

        async def main() -> list[tuple[int, int]]:
            answers = []
            for _ in range(8):  # new connections, from new client ports
                async with connect(server.port, certs) as client:
                    first, second = await asyncio.gather(client.get(), client.get())
                    answers.append((first.status, int(bytes(first.body))))
                    answers.append((second.status, int(bytes(second.body))))
            return answers

        answers = run(main())
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert {status for status, _ in answers} == {200}
    assert {pid for _, pid in answers} <= pids
    assert "HTTP/3 on https://127.0.0.1:" in server.stderr.text


def test_gunicorn_worker_serves_http3(certs: Certs) -> None:
    """A FulmenWorker subclass with `http3` in its CONFIG_KWARGS, under gunicorn's TLS
    settings: each worker binds its UDP socket beside the arbiter's TCP one."""
    tls = ("--certfile", certs.cert, "--keyfile", certs.key)
    with Gunicorn(*tls, worker="tests.apps_gunicorn.H3Worker", workers=2) as server:

        async def main() -> list[Any]:
            async with connect(server.port, certs) as client:
                return [await client.get(b"/path") for _ in range(3)]

        responses = run(main())
        pids = server.worker_pids()
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert [r.status for r in responses] == [200, 200, 200]
    assert {json.loads(bytes(r.body))["pid"] for r in responses} <= set(pids)
