"""`--workers N`: the supervisor, its health checks, its signals and zero-downtime restarts.

Every test runs `python -m fulmen ... --workers N` as a real process tree and talks to it over
real sockets. The zero-downtime tests keep a client busy (a new connection per request, no
retries) while workers are replaced, and require every request to succeed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import fulmen
from fulmen.config import Config
from tests.conftest import TIMEOUT, recv_until_closed
from tests.helpers import Fulmen, clean_env, run_fulmen
from tests.protocols.http1_raw import in_loop

APP = "tests.apps_workers:app"
READY = r"Worker process \[(\d+)\] is ready"


def start(*args: str, workers: int = 2, env: dict[str, str] | None = None) -> Fulmen:
    return Fulmen(APP, "--port", "0", "--workers", str(workers), *args, env=env)


def ready_pids(server: Fulmen, count: int, exclude: set[int] | None = None) -> set[int]:
    """Wait for `count` workers not in `exclude` to report ready; their process ids."""
    seen = set(exclude or ())
    found: set[int] = set()
    while len(found) < count:
        others = "".join(f"(?!{pid}\\])" for pid in seen)
        pid = int(server.stderr.wait_for(rf"Worker process \[{others}(\d+)\] is ready").group(1))
        seen.add(pid)
        found.add(pid)
    return found


def get_pid(server: Fulmen, path: str = "/") -> int:
    response = httpx.get(server.url + path, timeout=TIMEOUT)
    assert response.status_code == 200
    return int(response.text)


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie not yet reaped by its new parent counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


class Load:
    """A client sending requests in a loop from a thread, each on a new connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pids: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._answered = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # No keep-alive: each request connects anew, so every accept path is exercised.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(limits=limits, timeout=TIMEOUT) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(self.url)
                    assert response.status_code == 200, response.status_code
                    pid = int(response.text)
                except (httpx.HTTPError, AssertionError) as exc:
                    self.failures.append(repr(exc))
                    continue
                with self._answered:
                    self.pids.append(pid)
                    self._answered.notify_all()

    def wait_for(self, count: int, pids: set[int] | None = None) -> None:
        """Wait until `count` more requests were answered (by one of `pids`, if given)."""
        deadline = time.monotonic() + TIMEOUT
        with self._answered:
            start = len(self.pids)
            while sum(1 for p in self.pids[start:] if pids is None or p in pids) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no answers; failures: {self.failures[-3:]}"
                self._answered.wait(remaining)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()


@contextlib.contextmanager
def load(url: str) -> Iterator[Load]:
    client = Load(url)
    try:
        yield client
    finally:
        client.stop()


# Zero downtime


def test_sighup_restarts_every_worker_without_a_failed_request() -> None:
    with start() as server:
        old = ready_pids(server, 2)
        began = time.monotonic()
        with load(server.url) as client:
            client.wait_for(20)
            generations = [old]
            for _ in range(2):  # two rolling restarts, back to back, under load
                server.signal(signal.SIGHUP)
                new = ready_pids(server, 2, exclude=set().union(*generations))
                for pid in generations[-1]:
                    server.stderr.wait_for(rf"Worker process \[{pid}\] stopped \(exit code 0\)")
                client.wait_for(20, new)
                generations.append(new)
        elapsed = time.monotonic() - began
        assert client.failures == []
        assert set(client.pids[-20:]) <= generations[-1]
        assert server.stderr.text.count("Received SIGHUP, restarting the workers") == 2
        # Each new worker was serving before its predecessor was asked to stop.
        text = server.stderr.text
        for pid in generations[0] | generations[1]:
            stopping = text.index(f"Stopping worker process [{pid}] (replaced by [")
            successor = re.search(rf"\[{pid}\] \(replaced by \[(\d+)\]", text)
            assert successor is not None
            assert text.index(f"Worker process [{successor.group(1)}] is ready") < stopping
        print(f"2 SIGHUP restarts under load: {len(client.pids)} requests in {elapsed:.2f} s")


def test_request_limit_recycles_workers_without_a_failed_request() -> None:
    args = ("--limit-max-requests", "20", "--limit-max-requests-jitter", "5", "--no-access-log")
    with start(*args) as server:
        first = ready_pids(server, 2)
        began = time.monotonic()
        with load(server.url) as client:
            # Eight workers reach their limits (20 to 25 responses) and are replaced.
            recycled = ready_pids(server, 8, exclude=first)
            client.wait_for(10)
        elapsed = time.monotonic() - began
        assert client.failures == []
        text = server.stderr.text
        assert text.count("reached its request limit; starting a replacement") >= 8
        limits = [int(n) for n in re.findall(r"Maximum request limit of (\d+) exceeded", text)]
        assert len(limits) >= 8
        assert all(20 <= limit <= 25 for limit in limits), limits
        assert len(set(limits)) > 1  # each worker drew its own jitter
        served = {pid: client.pids.count(pid) for pid in set(client.pids)}
        for pid in first:
            assert served[pid] >= 20, served  # a worker leaves only once its limit is reached
        # The workers that reached their limits: the first two and six of their replacements.
        assert sum(1 for pid in recycled if served.get(pid, 0) >= 20) >= 6, served
        print(f"8 recycles under load: {len(client.pids)} requests in {elapsed:.2f} s")


# Health


def test_killed_worker_is_replaced() -> None:
    with start() as server:
        pids = ready_pids(server, 2)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        server.stderr.wait_for(
            rf"Worker process \[{victim}\] died \(killed by SIGKILL\); starting a replacement"
        )
        (replacement,) = ready_pids(server, 1, exclude=pids)
        answered = {get_pid(server) for _ in range(20)}
        assert victim not in answered
        assert answered <= (pids - {victim}) | {replacement}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_blocked_worker_is_killed_after_the_healthcheck_timeout(loop: str) -> None:
    with start("--timeout-worker-healthcheck", "0.5", "--loop", loop) as server:
        pids = ready_pids(server, 2)
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /block HTTP/1.1\r\nhost: x\r\n\r\n")
            blocked = int(server.stderr.wait_for(r"blocking worker (\d+)").group(1))
            began = time.monotonic()
            server.stderr.wait_for(
                rf"Worker process \[{blocked}\] did not answer the health check within 0.5 s"
            )
            elapsed = time.monotonic() - began
            assert sock.recv(100) == b""  # the blocked request dies with its worker
        assert 0.4 <= elapsed < 5
        server.stderr.wait_for(rf"Worker process \[{blocked}\] stopped \(killed by SIGKILL\)")
        (replacement,) = ready_pids(server, 1, exclude=pids)
        assert replacement != blocked
        assert blocked not in {get_pid(server) for _ in range(10)}


@pytest.mark.parametrize(
    ("app", "code", "message"),
    [
        ("tests.apps_workers:startup_fails", 3, "Application startup failed"),
        ("tests.apps_workers:missing", 1, 'Attribute "missing" not found'),
    ],
)
def test_worker_startup_failure_stops_the_supervisor(app: str, code: int, message: str) -> None:
    result = run_fulmen(app, "--port", "0", "--workers", "2")
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert re.search(
        rf"Worker process \[\d+\] failed to start \(exit code {code}\)\. Stopping all workers",
        result.stderr,
    )
    assert result.stderr.count("Started server process") <= 2  # no crash loop
    assert "Finished parent process" in result.stderr


def test_failed_rolling_restart_keeps_the_old_workers(tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    env = clean_env(FULMEN_TEST_FAIL_FLAG=str(flag))
    with Fulmen(
        "tests.apps_workers:fails_when_flagged", "--port", "0", "--workers", "2", env=env
    ) as server:
        pids = ready_pids(server, 2)
        flag.touch()  # the next worker to start fails: a broken deploy
        server.signal(signal.SIGHUP)
        server.stderr.wait_for(r"failed to start \(exit code 3\)\. Restart aborted")
        assert {get_pid(server) for _ in range(10)} <= pids
        flag.unlink()
        server.signal(signal.SIGHUP)  # the fixed deploy rolls out
        new = ready_pids(server, 2, exclude=pids)
        for pid in pids:
            server.stderr.wait_for(rf"Worker process \[{pid}\] stopped")
        assert {get_pid(server) for _ in range(10)} <= new
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


def test_workers_leave_when_the_supervisor_is_killed() -> None:
    with start() as server:
        pids = ready_pids(server, 2)
        server.signal(signal.SIGKILL)
        for _ in pids:
            server.stderr.wait_for("The supervisor process is gone. Shutting down.")
        wait_gone(pids)


# Signals


def test_ttin_and_ttou_change_the_number_of_workers() -> None:
    with start() as server:
        pids = ready_pids(server, 2)
        server.signal(signal.SIGTTIN)
        server.stderr.wait_for("Received SIGTTIN, increasing the number of workers to 3")
        pids |= ready_pids(server, 1, exclude=pids)
        answered: set[int] = set()
        deadline = time.monotonic() + TIMEOUT
        while answered != pids and time.monotonic() < deadline:
            answered.add(get_pid(server))
        assert answered == pids
        server.signal(signal.SIGTTOU)
        server.stderr.wait_for("Received SIGTTOU, decreasing the number of workers to 2")
        stopped = int(
            server.stderr.wait_for(r"Stopping worker process \[(\d+)\] \(fewer workers").group(1)
        )
        server.stderr.wait_for(rf"Worker process \[{stopped}\] stopped \(exit code 0\)")
        server.signal(signal.SIGTTOU)
        server.stderr.wait_for("decreasing the number of workers to 1")
        server.signal(signal.SIGTTOU)
        server.stderr.wait_for("Received SIGTTOU, but one worker is the minimum")
        wait_gone(pids - {get_pid(server)})
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


def close_code(ws: ClientConnection) -> int | None:
    """The code of the close frame the server sends next."""
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None, "no close frame"
    return closed.value.rcvd.code


def open_websockets(stack: contextlib.ExitStack, port: int, pids: set[int]) -> dict[Any, int]:
    """WebSockets until each worker in `pids` holds at least one: {client: worker pid}."""
    held: dict[Any, int] = {}
    for _ in range(200):
        ws = stack.enter_context(connect(f"ws://127.0.0.1:{port}/", open_timeout=TIMEOUT))
        held[ws] = int(ws.recv(timeout=TIMEOUT))
        if set(held.values()) == pids:
            return held
    raise AssertionError(f"WebSockets did not reach every worker: {set(held.values())}")


def test_websockets_close_with_1012_on_restart_and_1001_on_shutdown() -> None:
    """A worker replaced (SIGHUP) or removed (SIGTTOU) closes its WebSockets with 1012 (service
    restart: reconnect); a stop of the whole service with 1001 (going away)."""
    with start() as server, contextlib.ExitStack() as stack:
        pids = ready_pids(server, 2)
        held = open_websockets(stack, server.port, pids)
        server.signal(signal.SIGHUP)
        assert [close_code(ws) for ws in held] == [1012] * len(held)
        new = ready_pids(server, 2, exclude=pids)
        held = open_websockets(stack, server.port, new)
        server.signal(signal.SIGTTOU)
        stopped = int(
            server.stderr.wait_for(r"Stopping worker process \[(\d+)\] \(fewer workers").group(1)
        )
        removed = [ws for ws, pid in held.items() if pid == stopped]
        assert [close_code(ws) for ws in removed] == [1012] * len(removed)
        server.signal(signal.SIGTERM)
        kept = [ws for ws, pid in held.items() if pid != stopped]
        assert [close_code(ws) for ws in kept] == [1001] * len(kept)
        assert server.wait() == 0


def test_sigterm_stops_every_worker_within_the_graceful_timeout() -> None:
    with start("--timeout-graceful-shutdown", "1") as server:
        pids = ready_pids(server, 2)
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /forever HTTP/1.1\r\nhost: x\r\n\r\n")
            server.stderr.wait_for("forever request started")
            began = time.monotonic()
            server.signal(signal.SIGTERM)
            server.stderr.wait_for("Received SIGTERM, stopping all workers")
            server.signal(signal.SIGHUP)  # ignored while stopping: no new workers
            assert server.wait() == 0
            elapsed = time.monotonic() - began
        assert elapsed < 1 + 5  # the graceful timeout, plus the wait for cancelled requests
        text = server.stderr.text
        assert "Received SIGHUP" not in text
        assert text.count("Started server process") == 2
        assert "Cancelling 1 running request(s)" in text
        assert text.count("Finished server process") == 2
        wait_gone(pids)


@pytest.mark.slow
def test_worker_that_does_not_stop_is_killed() -> None:
    """The stop bound: --timeout-graceful-shutdown plus 5 s, then SIGKILL (the lifespan
    shutdown blocks the worker's loop: its own bound cannot end it)."""
    with Fulmen(
        "tests.apps_workers:shutdown_blocks",
        "--port",
        "0",
        "--workers",
        "2",
        "--timeout-graceful-shutdown",
        "0.2",
    ) as server:
        pids = ready_pids(server, 2)
        began = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
        elapsed = time.monotonic() - began
        assert server.stderr.text.count("did not stop in time; killing it") == 2
        assert 5 <= elapsed < 9
        wait_gone(pids)


def test_second_sigint_forces_the_workers_out() -> None:
    with start() as server:
        pids = ready_pids(server, 2)
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /forever HTTP/1.1\r\nhost: x\r\n\r\n")
            server.stderr.wait_for("forever request started")
            began = time.monotonic()
            server.signal(signal.SIGINT)
            server.stderr.wait_for("Received SIGINT, stopping all workers")
            server.stderr.wait_for("Waiting for connections to close")
            server.signal(signal.SIGINT)
            assert server.wait() == 0
        assert time.monotonic() - began < 5  # not the 30 s graceful timeout
        assert "Forced exit." in server.stderr.text
        wait_gone(pids)


@pytest.mark.parametrize("mode", ["workers", "reload"])
def test_ctrl_c_runs_the_lifespan_shutdown_of_every_server_process(
    mode: str, tmp_path: Path
) -> None:
    """Ctrl+C reaches the supervisor and its server processes alike: it stops them gracefully
    (a request in flight is answered), each runs its app's lifespan shutdown (a FastAPI hook
    writes a file), and nothing is logged as an error."""
    count = 2 if mode == "workers" else 1
    args = ["--workers", "2"] if mode == "workers" else ["--reload", "--reload-dir", str(tmp_path)]
    markers = tmp_path / "markers"
    markers.mkdir()
    env = clean_env(TEST_MARKER_DIR=str(markers))
    app = "tests.apps_gunicorn:fastapi_app"
    with Fulmen(app, "--port", "0", *args, env=env, new_session=True) as server:
        started = server.stderr.wait_count(r"^fastapi startup \d+$", count)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.get, f"{server.url}/slow", timeout=TIMEOUT)
            server.stderr.wait_for("slow request started")
            server.ctrl_c()
            assert slow.result(TIMEOUT).status_code == 200
        assert server.wait() == 0
    pids = sorted(int(line.split()[-1]) for line in started)
    assert sorted(path.name for path in markers.iterdir()) == [f"shutdown-{pid}" for pid in pids]
    for text in ("Traceback", "ERROR", "CancelledError"):
        assert text not in server.stderr.text, server.stderr.text


# What makes restarts lossless in each server: a connection accepted before the shutdown began
# is served its request (not closed unread), while idle keep-alive connections close at once.


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def poll_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.mark.parametrize("partial", [False, True], ids=["new", "head-arriving"])
def test_connection_accepted_before_shutdown_is_served(serve: Any, partial: bool) -> None:
    with serve(ok_app) as srv, srv.connect() as sock:
        state = srv.server.state
        poll_until(lambda: len(state.connections) == 1)
        if partial:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            poll_until(lambda: not next(iter(state.connections)).idle)
        srv.server.should_exit = True
        poll_until(lambda: state.shutting_down)
        sock.sendall(b"" if partial else b"GET / HTTP/1.1\r\n")
        sock.sendall(b"host: x\r\n\r\n")
        response = recv_until_closed(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert body == b"ok"


def test_connection_made_after_the_shutdown_began_gets_the_grace(serve: Any) -> None:
    """A connection the loop accepted before the listener closed may reach `connection_made`
    after the shutdown began (an accept task, a TLS handshake past its wait): it gets the same
    grace as an idle one, and its request is answered with `connection: close`."""
    with serve(ok_app) as srv:
        state = srv.server.state
        in_loop(srv, lambda: setattr(state, "shutting_down", True))  # the listener still open
        with srv.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            response = recv_until_closed(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert body == b"ok"


def test_silent_new_connection_is_closed_by_the_next_sweep(serve_one: Any) -> None:
    with serve_one(ok_app) as srv, srv.connect() as sock:
        state = srv.server.state
        poll_until(lambda: len(state.connections) == 1)
        began = time.monotonic()
        srv.server.should_exit = True
        assert recv_until_closed(sock) == b""
        assert time.monotonic() - began < 3  # one to two ticks, not the 10 s header timeout


# Configuration


def test_web_concurrency_sets_the_number_of_workers() -> None:
    with Fulmen(APP, "--port", "0", env=clean_env(WEB_CONCURRENCY="2")) as server:
        ready_pids(server, 2)
        assert "Started parent process" in server.stderr.text
    with Fulmen(APP, "--port", "0", "--workers", "1", env=clean_env(WEB_CONCURRENCY="3")) as one:
        one.stderr.wait_for("Application startup complete")
        assert "Started parent process" not in one.stderr.text


def test_unix_socket_shared_by_the_workers(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    with Fulmen(APP, "--uds", str(path), "--workers", "2", wait_started=False) as server:
        server.stderr.wait_for("Fulmen running on http on unix socket")
        pids = ready_pids(server, 2)
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
            assert int(client.get("http://fulmen/").text) in pids
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert not path.exists()


def test_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_fulmen(APP, "--port", str(port), "--workers", "2")
    assert result.returncode == 3
    assert "Address already in use" in result.stderr


def test_workers_need_an_import_string(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.apps_workers import app

    with pytest.raises(SystemExit) as exc:
        fulmen.run(app, workers=2)
    assert exc.value.code == 1
    assert "import string" in capsys.readouterr().err


def test_config_resolves_and_checks_the_process_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    assert Config("a:b").workers == 1
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    assert Config("a:b").workers == 4
    assert Config("a:b", workers=2).workers == 2
    monkeypatch.setenv("WEB_CONCURRENCY", "many")
    with pytest.raises(ValueError, match="WEB_CONCURRENCY must be an integer"):
        Config("a:b")
    with pytest.raises(ValueError, match="workers must be at least 1"):
        Config("a:b", workers=0)
    with pytest.raises(ValueError, match="timeout_worker_healthcheck"):
        Config("a:b", workers=1, timeout_worker_healthcheck=0)
    with pytest.raises(ValueError, match="limit_max_requests_jitter"):
        Config("a:b", workers=1, limit_max_requests_jitter=-1)
