"""`--http3` with `--workers N`: each worker process binds its own UDP socket on the port
(SO_REUSEPORT), and every HTTP/3 connection is served whole by one of them."""

from __future__ import annotations

import asyncio
import signal

from tests.conftest import Certs
from tests.helpers import Fulmen
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
