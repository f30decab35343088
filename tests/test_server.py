"""The server: the Python API, signals, graceful shutdown, and the socket kinds it binds."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import socket
import stat
import sys
import threading
import time

import httpx
import pytest

import fulmen
from tests.conftest import TIMEOUT, recv_response, recv_until_closed
from tests.helpers import Fulmen, ipv6_available, messages, record_logs, run_fulmen


async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


# Python API


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX], ids=["inet", "unix"])
def test_serve_inside_the_callers_running_loop(family, tmp_path, monkeypatch) -> None:
    loops = []

    async def app(scope, receive, send):
        loops.append(asyncio.get_running_loop())
        await hello(scope, receive, send)

    server = fulmen.Server(fulmen.Config(app, lifespan="off"))

    async def main() -> None:
        with socket.socket(family) as sock:
            if family == socket.AF_UNIX:
                sock.bind(str(tmp_path / "api.sock"))
                transport = httpx.AsyncHTTPTransport(uds=sock.getsockname())
                url = "http://localhost"
            else:
                sock.bind(("127.0.0.1", 0))
                transport = httpx.AsyncHTTPTransport()
                url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            task = asyncio.create_task(server.serve(sockets=[sock]))

            async def started() -> None:
                while not server.started:
                    assert not task.done()
                    await asyncio.sleep(0.005)

            await asyncio.wait_for(started(), TIMEOUT)
            async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as client:
                response = await client.get(f"{url}/api")
            assert response.text == "/api"
            assert loops == [asyncio.get_running_loop()]  # served on the caller's loop
            assert not server.should_exit
            server.should_exit = True
            assert server.should_exit
            await asyncio.wait_for(task, TIMEOUT)

    with record_logs(monkeypatch) as logs:
        asyncio.run(main())
    lines = messages(logs)
    assert lines.index("Shutting down") < lines.index(f"Finished server process [{os.getpid()}]")
    server.should_exit = True  # after the loop closed: harmless


def test_should_exit_before_serving_returns_at_once() -> None:
    server = fulmen.Server(fulmen.Config(hello, lifespan="off"))
    server.should_exit = True
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        asyncio.run(asyncio.wait_for(server.serve(sockets=[sock]), TIMEOUT))
    assert server.started


def test_run_serves_until_the_request_limit(monkeypatch) -> None:
    # `fulmen.run` in a thread (no signal handlers there), on an inherited socket.
    with socket.socket() as sock, record_logs(monkeypatch) as logs:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        fd = os.dup(sock.fileno())  # the server owns (and closes) its copy
        errors: list[BaseException] = []

        def target() -> None:
            try:
                fulmen.run(hello, fd=fd, limit_max_requests=2, lifespan="off", loop="asyncio")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with httpx.Client(timeout=TIMEOUT) as client:
            assert [client.get(f"{url}/{i}").text for i in range(2)] == ["/0", "/1"]
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert errors == []
    assert "Maximum request limit of 2 exceeded. Terminating process." in messages(logs)


async def freeze_count(scope, receive, send) -> None:
    """Answers with how many objects the garbage collector has frozen."""
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body", "body": str(gc.get_freeze_count()).encode()})


def test_run_freezes_the_objects_alive_at_startup_until_it_returns() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        fd = os.dup(sock.fileno())
        thread = threading.Thread(
            target=fulmen.run,
            args=(freeze_count,),
            kwargs={"fd": fd, "limit_max_requests": 1, "lifespan": "off", "loop": "asyncio"},
        )
        thread.start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with httpx.Client(timeout=TIMEOUT) as client:
            frozen = int(client.get(url).text)
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert frozen > 1000  # the modules, the app and everything else alive then
    assert gc.get_freeze_count() == 0  # given back


def test_serve_in_a_hosts_loop_freezes_nothing(serve_one) -> None:
    with serve_one(freeze_count) as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "0"


def test_app_object_leaves_sys_path_alone(serve_one) -> None:
    before = list(sys.path)
    with serve_one(hello) as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "/"
    assert sys.path == before


# Signals and graceful shutdown (a real process)


def serve_app(*args: str) -> Fulmen:
    return Fulmen("tests.apps:app", "--port", "0", *args)


def request(server: Fulmen, path: str = "/") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    sock.sendall(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    return sock


def assert_in_order(lines: list[str], expected: list[str]) -> None:
    positions = [lines.index(line) for line in expected]
    assert positions == sorted(positions), lines


SHUTDOWN = [
    "INFO:     Shutting down",
    "INFO:     Waiting for application shutdown.",
    "INFO:     Application shutdown complete.",
]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_gracefully(sig) -> None:
    with serve_app("--lifespan", "on") as server:
        assert httpx.get(server.url + "/x", timeout=TIMEOUT).text == "/x"
        server.signal(sig)
        assert server.wait() == 0
    lines = server.stderr.lines
    assert_in_order(lines, SHUTDOWN)
    assert lines[-1] == f"INFO:     Finished server process [{server.proc.pid}]"
    assert lines[-2] == "INFO:     Application shutdown complete."


def test_in_flight_request_completes_during_shutdown() -> None:
    with serve_app("--lifespan", "on") as server, request(server, "/slow") as sock:
        server.stderr.wait_for("slow request started")
        server.signal(signal.SIGTERM)
        server.stderr.wait_for("Shutting down")
        response = recv_response(sock)
        assert server.wait() == 0
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()  # no more requests on this connection
    assert body == b"/slow"
    assert_in_order(server.stderr.lines, SHUTDOWN)


def test_idle_keep_alive_connection_closed_at_once() -> None:
    with serve_app("--lifespan", "off", "--timeout-keep-alive", "60") as server:
        with request(server, "/idle") as sock:
            assert recv_response(sock).endswith(b"/idle")
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            assert sock.recv(1) == b""  # closed by the server, not by the keep-alive timeout
        assert server.wait() == 0
        assert time.monotonic() - started < 2


def test_graceful_shutdown_timeout_cancels_requests() -> None:
    args = ("--lifespan", "on", "--timeout-graceful-shutdown", "0.5")
    with serve_app(*args) as server, request(server, "/forever") as sock:
        server.stderr.wait_for("forever request started")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert recv_until_closed(sock) == b""  # cancelled: no response
        assert server.wait() == 0
        elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 3
    assert_in_order(
        server.stderr.lines,
        [
            "INFO:     Shutting down",
            "WARNING:  Graceful shutdown timed out after 0.5 seconds.",
            "WARNING:  Cancelling 1 running request(s).",
            "INFO:     Application shutdown complete.",
        ],
    )


def test_second_sigint_exits_at_once() -> None:
    with serve_app("--lifespan", "on") as server, request(server, "/forever") as sock:
        server.stderr.wait_for("forever request started")
        server.signal(signal.SIGINT)
        server.stderr.wait_for("Waiting for connections to close")
        started = time.monotonic()
        server.signal(signal.SIGINT)
        assert server.wait() == 0
        assert time.monotonic() - started < 2
        assert recv_until_closed(sock) == b""
    lines = server.stderr.lines
    assert "WARNING:  Forced exit." in lines
    assert "INFO:     Application shutdown complete." in lines  # the app's cleanup still runs


def test_a_third_sigint_abandons_a_lifespan_shutdown_that_hangs() -> None:
    with Fulmen("tests.apps_workers:shutdown_hangs", "--port", "0") as server:
        server.signal(signal.SIGINT)
        server.stderr.wait_for("shutdown hangs in")
        server.signal(signal.SIGINT)  # forced: the lifespan shutdown goes on
        server.stderr.wait_for("Forced exit.")
        assert server.proc.poll() is None
        server.signal(signal.SIGINT)
        assert server.wait() == 0
    text = server.stderr.text
    assert "WARNING:  Application shutdown abandoned." in text
    assert "Traceback" not in text and "ERROR" not in text, text


def test_the_lifespan_shutdown_is_bounded_by_the_graceful_timeout() -> None:
    args = ("--port", "0", "--timeout-graceful-shutdown", "0.5")
    with Fulmen("tests.apps_workers:shutdown_hangs", *args) as server:
        server.signal(signal.SIGTERM)
        server.stderr.wait_for("shutdown hangs in")
        started = time.monotonic()
        assert server.wait() == 0
        assert time.monotonic() - started < 3
    text = server.stderr.text
    assert "ERROR:    Application shutdown did not complete within 0.5 seconds." in text
    assert "Traceback" not in text, text


@pytest.mark.parametrize("stale", [False, True], ids=["new", "stale"])
def test_unix_socket_served_and_removed(stale, tmp_path) -> None:
    path = str(tmp_path / "fulmen.sock")
    if stale:
        with socket.socket(socket.AF_UNIX) as crashed:  # a socket file left by a crashed server
            crashed.bind(path)
    with Fulmen("tests.apps:app", "--uds", path, "--lifespan", "off") as server:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        transport = httpx.HTTPTransport(uds=path)
        with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
            assert client.get("http://localhost/over-uds").text == "/over-uds"
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert f"INFO:     Fulmen running on http on unix socket {path} (Press CTRL+C to quit)" in (
        server.stderr.lines
    )
    assert not os.path.exists(path)


def test_unix_socket_path_taken_by_a_regular_file(tmp_path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    result = run_fulmen("tests.apps:app", "--uds", str(path), "--lifespan", "on")
    assert result.returncode == 3
    lines = result.stderr.splitlines()
    # Started, failed to bind: the application still gets its shutdown.
    assert_in_order(
        lines,
        [
            "INFO:     Application startup complete.",
            f"ERROR:    {path} exists and is not a socket",
            "INFO:     Application shutdown complete.",
        ],
    )
    assert path.read_text() == "precious"


def test_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_fulmen("tests.apps:app", "--port", str(port), "--lifespan", "off")
    assert result.returncode == 3
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_ipv6_host() -> None:
    with serve_app("--host", "::1", "--lifespan", "off") as server:
        assert server.url == f"http://[::1]:{server.port}"
        assert httpx.get(server.url + "/v6", timeout=TIMEOUT).text == "/v6"


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX], ids=["inet", "unix"])
def test_inherited_socket(family, tmp_path) -> None:
    with socket.socket(family) as sock:
        address = str(tmp_path / "inherited.sock") if family == socket.AF_UNIX else ("127.0.0.1", 0)
        sock.bind(address)
        fd = sock.fileno()
        with Fulmen(
            "tests.apps:app", "--fd", str(fd), "--lifespan", "off", pass_fds=(fd,)
        ) as server:
            if family == socket.AF_UNIX:
                transport = httpx.HTTPTransport(uds=address)
                url = "http://localhost"
                assert server.stderr.wait_for(re.escape(f"unix socket {address}"))
            else:
                transport = httpx.HTTPTransport()
                url = server.url
                assert server.port == sock.getsockname()[1]
            with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
                assert client.get(url + "/fd").text == "/fd"
            server.signal(signal.SIGTERM)
            assert server.wait() == 0
