"""`--metrics-bind`: the Prometheus text endpoint of one server process, and with `--workers N`
the supervisor's, summing its workers' counters."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fulmen import Config
from fulmen.addresses import parse_address
from fulmen.metrics import BUCKETS, Metrics
from tests.conftest import TIMEOUT, RunningServer
from tests.helpers import Fulmen, clean_env, run_fulmen


def _metrics_url(srv: RunningServer) -> str:
    for server in srv.server.servers:
        for sock in server.sockets:
            if sock.getsockname() != srv.sock.getsockname():
                host, port = sock.getsockname()[:2]
                return f"http://{host}:{port}/metrics"
    raise AssertionError("no metrics listener")


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def status_app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    path = scope["path"]
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/slow":
        await scope["state"]["release"].wait()
    status = 404 if path == "/missing" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_requests_by_status_histogram_and_connections(serve_one: Any) -> None:
    with serve_one(status_app, metrics_bind="127.0.0.1:0") as srv:
        url = _metrics_url(srv)
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
            for path in ("/boom", "/", "/", "/missing"):  # a 500 closes its connection
                client.get(path)
            # The client's keep-alive connection is open while scraping.
            response = httpx.get(url, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = _samples(response.text)
        assert samples['fulmen_requests_total{status="200"}'] == 2
        assert samples['fulmen_requests_total{status="404"}'] == 1
        assert samples['fulmen_requests_total{status="500"}'] == 1
        assert samples["fulmen_requests_in_flight"] == 0
        assert samples["fulmen_connections_open"] == 1
        assert samples["fulmen_worker_restarts_total"] == 0
        assert samples["fulmen_request_duration_seconds_count"] == 4
        assert samples['fulmen_request_duration_seconds_bucket{le="+Inf"}'] == 4
        buckets = [
            samples[f'fulmen_request_duration_seconds_bucket{{le="{bound!r}"}}']
            for bound in BUCKETS
        ]
        assert buckets == sorted(buckets) and buckets[-1] <= 4
        assert 0 < samples["fulmen_request_duration_seconds_sum"] < 4 * 10
        assert "# TYPE fulmen_request_duration_seconds histogram" in response.text


def test_in_flight_during_a_slow_request(serve_one: Any) -> None:
    with serve_one(status_app, metrics_bind="127.0.0.1:0") as srv:
        loop = srv.server._loop
        assert loop is not None
        release = asyncio.Event()
        srv.server.state.app_state["release"] = release  # type: ignore[union-attr]
        url = _metrics_url(srv)
        result: list[int] = []

        def slow() -> None:
            result.append(httpx.get(srv.url + "/slow", timeout=TIMEOUT).status_code)

        thread = threading.Thread(target=slow)
        thread.start()
        try:
            for _ in range(int(TIMEOUT / 0.02)):
                samples = _samples(httpx.get(url, timeout=TIMEOUT).text)
                if samples["fulmen_requests_in_flight"] == 1:
                    break
                threading.Event().wait(0.02)
            assert samples["fulmen_requests_in_flight"] == 1
            assert samples["fulmen_connections_open"] == 1
            assert "fulmen_request_duration_seconds_count 0" in httpx.get(url).text
        finally:
            loop.call_soon_threadsafe(release.set)
            thread.join(TIMEOUT)
        assert result == [200]
        samples = _samples(httpx.get(url, timeout=TIMEOUT).text)
        assert samples["fulmen_requests_in_flight"] == 0
        assert samples['fulmen_requests_total{status="200"}'] == 1


def test_other_paths_and_methods(serve_one: Any) -> None:
    with serve_one(status_app, metrics_bind="127.0.0.1:0") as srv:
        url = _metrics_url(srv)
        base = url.removesuffix("/metrics")
        assert httpx.get(base + "/other", timeout=TIMEOUT).status_code == 404
        response = httpx.post(url, timeout=TIMEOUT)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
        head = httpx.head(url + "?x=1", timeout=TIMEOUT)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0
        # A client that sends no complete head is closed, and the endpoint keeps serving.
        host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""
        assert httpx.get(url, timeout=TIMEOUT).status_code == 200


def test_off_the_app_is_not_wrapped(serve_one: Any) -> None:
    with serve_one(status_app) as srv:
        assert srv.server.metrics is None
        assert srv.server.state is not None and srv.server.state.app is status_app
        assert len(srv.server.servers) == 1


def test_websocket_and_lifespan_pass_through() -> None:
    seen = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    metrics = Metrics()
    asyncio.run(metrics.instrument(app)({"type": "websocket"}, None, None))  # type: ignore[arg-type]
    assert seen == ["websocket"] and metrics.duration_count == 0 and metrics.requests == {}


def test_address_validation() -> None:
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    for bad in ("9100", "unix:/tmp/m.sock", "host:port"):
        with pytest.raises(ValueError, match="--metrics-bind"):
            Config("tests.apps:app", metrics_bind=bad)
    assert Config("tests.apps:app", metrics_bind="127.0.0.1:0", workers=2).workers == 2


def test_cli_serves_metrics() -> None:
    env = clean_env(FULMEN_METRICS_BIND="127.0.0.1:0")
    with Fulmen("tests.apps:app", "--port", "0", env=env) as proc:
        url = proc.stderr.wait_for(re.compile(r"Metrics on (\S+)")).group(1)
        httpx.get(proc.url, timeout=TIMEOUT)
        samples = _samples(httpx.get(url, timeout=TIMEOUT).text)
        assert sum(v for k, v in samples.items() if k.startswith("fulmen_requests_total")) == 1


def test_metrics_port_taken_stops_the_server() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_fulmen("tests.apps:app", "--port", "0", "--metrics-bind", f"127.0.0.1:{port}")
    assert "address already in use" in result.stderr.lower()
    assert "Fulmen running on" not in result.stderr


# --workers N: the supervisor serves the sum over its workers.

WORKERS_APP = "tests.apps_workers:app"
# A short health check interval (0.25 s): workers send their counters with each answer.
WORKER_ARGS = ("--port", "0", "--workers", "2", "--timeout-worker-healthcheck", "0.5")


def _total(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("fulmen_requests_total"))


def _scrape_until(url: str, done: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Scrape until `done(samples)` (the workers' counters arrive with their next PONG)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        samples = _samples(httpx.get(url, timeout=TIMEOUT).text)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def _ready(proc: Fulmen, count: int, exclude: frozenset[int] = frozenset()) -> set[int]:
    """Wait for `count` workers not in `exclude` to be ready; their process ids."""
    seen = set(exclude)
    pids: set[int] = set()
    while len(pids) < count:
        others = "".join(f"(?!{pid}\\])" for pid in seen)
        match = proc.stderr.wait_for(rf"Worker process \[{others}(\d+)\] is ready")
        seen.add(int(match.group(1)))
        pids.add(int(match.group(1)))
    return pids


def _spread(proc: Fulmen, pids: set[int]) -> int:
    """Requests on new connections until every worker of `pids` answered; how many sent."""
    seen: set[int] = set()
    sent = 0
    deadline = time.monotonic() + TIMEOUT
    while sent < 10 or seen != pids:
        assert time.monotonic() < deadline, f"not every worker answered: {seen} of {pids}"
        response = httpx.get(proc.url, timeout=TIMEOUT)  # one connection each
        assert response.status_code == 200
        seen.add(int(response.text))
        sent += 1
    return sent


def test_workers_are_summed_and_a_killed_worker_is_counted() -> None:
    args = (*WORKER_ARGS, "--metrics-bind", "127.0.0.1:0")
    with Fulmen(WORKERS_APP, *args) as proc:
        url = proc.stderr.wait_for(re.compile(r"Metrics on (\S+)")).group(1)
        pids = _ready(proc, 2)
        sent = _spread(proc, pids)
        samples = _scrape_until(url, lambda s: _total(s) == sent)
        assert _total(samples) == sent
        assert samples['fulmen_requests_total{status="200"}'] == sent
        assert samples["fulmen_request_duration_seconds_count"] == sent
        assert samples['fulmen_request_duration_seconds_bucket{le="+Inf"}'] == sent
        assert samples["fulmen_requests_in_flight"] == 0
        assert samples["fulmen_worker_restarts_total"] == 0
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        proc.stderr.wait_for(rf"Worker process \[{victim}\] died")
        samples = _scrape_until(url, lambda s: s["fulmen_worker_restarts_total"] == 1)
        assert samples["fulmen_worker_restarts_total"] == 1
        # The killed worker's counts stay in the sum: no false counter reset.
        assert _total(samples) == sent
        assert samples["fulmen_request_duration_seconds_count"] == sent
        replacement = _ready(proc, 1, exclude=frozenset(pids))
        more = _spread(proc, (pids - {victim}) | replacement)
        samples = _scrape_until(url, lambda s: _total(s) == sent + more)
        assert _total(samples) == sent + more
        assert samples["fulmen_request_duration_seconds_count"] == sent + more


def test_rolling_restart_counts_each_replacement() -> None:
    args = (*WORKER_ARGS, "--metrics-bind", "127.0.0.1:0")
    with Fulmen(WORKERS_APP, *args) as proc:
        url = proc.stderr.wait_for(re.compile(r"Metrics on (\S+)")).group(1)
        pids = _ready(proc, 2)
        sent = _spread(proc, pids)
        proc.signal(signal.SIGHUP)
        for pid in pids:
            proc.stderr.wait_for(rf"Worker process \[{pid}\] stopped")
        samples = _scrape_until(url, lambda s: s["fulmen_worker_restarts_total"] == 2)
        assert samples["fulmen_worker_restarts_total"] == 2
        assert _total(samples) == sent
        assert samples["fulmen_request_duration_seconds_count"] == sent


def test_supervisor_metrics_port_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_fulmen(WORKERS_APP, *WORKER_ARGS, "--metrics-bind", f"127.0.0.1:{port}")
    assert result.returncode == 3
    assert "address already in use" in result.stderr.lower()
    assert "Started parent process" not in result.stderr


def test_recycled_workers_send_their_final_counts() -> None:
    # Health checks once a second: a worker leaving right after its last request has not
    # answered one since, so that request is counted only by its final snapshot.
    args = ("--port", "0", "--workers", "2", "--metrics-bind", "127.0.0.1:0")
    limit = ("--limit-max-requests", "3", "--limit-max-requests-jitter", "0", "--no-access-log")
    with Fulmen(WORKERS_APP, *args, *limit) as proc:
        url = proc.stderr.wait_for(re.compile(r"Metrics on (\S+)")).group(1)
        _ready(proc, 2)
        sent = 12
        for _ in range(sent):
            assert httpx.get(proc.url, timeout=TIMEOUT).status_code == 200

        def settled(samples: dict[str, float]) -> bool:
            recycled = proc.stderr.text.count("reached its request limit")
            return _total(samples) == sent and samples["fulmen_worker_restarts_total"] == recycled

        samples = _scrape_until(url, settled)
        assert _total(samples) == sent
        assert samples["fulmen_request_duration_seconds_count"] == sent
        assert samples["fulmen_worker_restarts_total"] >= 2
        assert settled(samples)


def test_a_stalled_scraper_delays_neither_supervision_nor_shutdown() -> None:
    args = (*WORKER_ARGS, "--metrics-bind", "127.0.0.1:0")
    with Fulmen(WORKERS_APP, *args) as proc:
        url = proc.stderr.wait_for(re.compile(r"Metrics on (\S+)")).group(1)
        _ready(proc, 2)
        host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as stalled:
            stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest of the head
            assert httpx.get(url, timeout=TIMEOUT).status_code == 200  # others are answered
            assert httpx.get(proc.url, timeout=TIMEOUT).status_code == 200
            began = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert proc.wait() == 0
            # Well within the endpoint's 5 s read timeout: the stalled scrape was cancelled.
            assert time.monotonic() - began < 4
            assert stalled.recv(100) == b""
        assert "Finished parent process" in proc.stderr.text
