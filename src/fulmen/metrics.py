"""`--metrics-bind HOST:PORT`: a Prometheus text endpoint (exposition format 0.0.4).

Off by default, and then free: nothing here is imported into the request path. When on, the
application is wrapped (as `access.timed_app` does for the access log's timing) to count each
HTTP request by status, the requests in flight and a histogram of their durations; the number
of open connections is read from the server's state when scraped. A second, plain asyncio
listener answers `GET /metrics` (one request per connection, then closed).

With `--workers N` the supervisor serves the endpoint (`WorkerTotals`, `EndpointThread`): each
worker sends a `snapshot` of its counters with every answer to a health check and a last one as
it exits, and a scrape shows their sum, plus the supervisor's own count of replaced workers.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fulmen.addresses import parse_address
from fulmen.sockets import bind_tcp
from fulmen.types import ASGIApp, Message, Receive, Scope, Send

# Prometheus' default buckets (seconds); +Inf is implied.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# A scraper gets this long to send its request head, of at most MAX_HEAD bytes.
READ_TIMEOUT = 5.0
MAX_HEAD = 8192

# A worker's counters as sent to its supervisor: requests by status, requests in flight, the
# histogram's per-bucket counts, its sum and count, and the open connections.
Snapshot = tuple[dict[int, int], int, list[int], float, int, int]


class Metrics:
    """The counters of one server process."""

    def __init__(self) -> None:
        self.requests: dict[int, int] = {}
        self.in_flight = 0
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf
        self.duration_sum = 0.0
        self.duration_count = 0
        self.worker_restarts = 0

    def instrument(self, app: ASGIApp) -> ASGIApp:
        """`app`, counting its HTTP requests. A request whose application failed before
        starting a response counts as the 500 the server answers with."""
        perf_counter = time.perf_counter

        async def measured(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 500

            async def status_send(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            self.in_flight += 1
            start = perf_counter()
            try:
                await app(scope, receive, status_send)
            finally:
                self.in_flight -= 1
                self.observe(status, perf_counter() - start)

        return measured

    def observe(self, status: int, seconds: float) -> None:
        """Count one finished request."""
        self.requests[status] = self.requests.get(status, 0) + 1
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        self.duration_count += 1

    def snapshot(self, connections: int) -> Snapshot:
        """These counters as plain, picklable values, with `connections` open connections."""
        return (
            dict(self.requests),
            self.in_flight,
            list(self.buckets),
            self.duration_sum,
            self.duration_count,
            connections,
        )

    def add(self, snapshot: Snapshot) -> None:
        """Add the counters of `snapshot` (not its gauges) to these."""
        requests, _, buckets, duration_sum, duration_count, _ = snapshot
        for status, count in requests.items():
            self.requests[status] = self.requests.get(status, 0) + count
        for index, count in enumerate(buckets[: len(self.buckets)]):
            self.buckets[index] += count
        self.duration_sum += duration_sum
        self.duration_count += duration_count

    def render(self, connections: int) -> bytes:
        """The exposition text, with `connections` open connections."""
        lines = [
            "# HELP fulmen_requests_total HTTP requests answered, by status code.",
            "# TYPE fulmen_requests_total counter",
        ]
        for status in sorted(self.requests):
            lines.append(f'fulmen_requests_total{{status="{status}"}} {self.requests[status]}')
        lines += [
            "# HELP fulmen_requests_in_flight HTTP requests being handled by the application.",
            "# TYPE fulmen_requests_in_flight gauge",
            f"fulmen_requests_in_flight {self.in_flight}",
            "# HELP fulmen_connections_open Open client connections.",
            "# TYPE fulmen_connections_open gauge",
            f"fulmen_connections_open {connections}",
            "# HELP fulmen_request_duration_seconds Time the application took per HTTP request.",
            "# TYPE fulmen_request_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip((*BUCKETS, None), self.buckets, strict=True):
            cumulative += count
            le = "+Inf" if bound is None else repr(bound)
            lines.append(f'fulmen_request_duration_seconds_bucket{{le="{le}"}} {cumulative}')
        lines += [
            f"fulmen_request_duration_seconds_sum {self.duration_sum!r}",
            f"fulmen_request_duration_seconds_count {self.duration_count}",
            "# HELP fulmen_worker_restarts_total Worker processes replaced by the supervisor.",
            "# TYPE fulmen_worker_restarts_total counter",
            f"fulmen_worker_restarts_total {self.worker_restarts}",
        ]
        return ("\n".join(lines) + "\n").encode()


def _response(status: bytes, body: bytes, extra: bytes = b"", head: bool = False) -> bytes:
    content_type = CONTENT_TYPE if status.startswith(b"200") else b"text/plain; charset=utf-8"
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode()
        + b"\r\nconnection: close\r\n" + extra + b"\r\n" + (b"" if head else body)
    )  # fmt: skip


class WorkerTotals:
    """The supervisor's sum over its workers: the latest snapshot of each live worker, plus the
    final counts of the workers gone, so that the sum never goes back when a worker leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the supervisor writes, the endpoint's thread reads
        self._live: dict[int, Snapshot] = {}
        self._retired = Metrics()

    def update(self, pid: int, snapshot: Snapshot) -> None:
        with self._lock:
            self._live[pid] = snapshot

    def retire(self, pid: int) -> None:
        """Worker `pid` is gone: its last counts stay in the sum, its gauges leave it."""
        with self._lock:
            snapshot = self._live.pop(pid, None)
            if snapshot is not None:
                self._retired.add(snapshot)

    def restarted(self) -> None:
        with self._lock:
            self._retired.worker_restarts += 1

    def render(self) -> bytes:
        with self._lock:
            total = Metrics()
            total.add(self._retired.snapshot(0))
            total.worker_restarts = self._retired.worker_restarts
            connections = 0
            for snapshot in self._live.values():
                total.add(snapshot)
                total.in_flight += snapshot[1]
                connections += snapshot[5]
        return total.render(connections)


def scrape_handler(
    metrics: Metrics, connections: Callable[[], int]
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """The `asyncio.start_server` callback answering `GET /metrics` with `metrics`."""
    return _handler(lambda: metrics.render(connections()))


def _handler(
    render: Callable[[], bytes],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if path != b"/metrics":
                response = _response(b"404 Not Found", b"Not Found\n")
            elif method not in (b"GET", b"HEAD"):
                response = _response(b"405 Method Not Allowed", b"", b"allow: GET, HEAD\r\n")
            else:
                body = render()
                response = _response(b"200 OK", body, head=method == b"HEAD")
            writer.write(response)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass  # a client that sent no complete request head, or left: closed unanswered
        finally:
            writer.close()

    return handle


async def start_endpoint(
    address: str, metrics: Metrics, connections: Callable[[], int], backlog: int
) -> asyncio.Server:
    """Listen on `address` (HOST:PORT) for scrapes."""
    host, port = parse_address(address)
    sock = bind_tcp(host, port, backlog)
    try:
        return await asyncio.start_server(
            scrape_handler(metrics, connections), sock=sock, limit=MAX_HEAD
        )
    except BaseException:  # pragma: no cover - a bound, listening socket is always accepted
        sock.close()
        raise


class EndpointThread(threading.Thread):
    """The endpoint of a process without an event loop (the supervisor of `--workers`): its
    own loop in a thread, so that a slow scraper never delays supervision. The socket is bound
    by the constructor, in the caller's thread, so that a taken address fails there."""

    def __init__(self, address: str, render: Callable[[], bytes], backlog: int) -> None:
        super().__init__(name="fulmen-metrics", daemon=True)
        host, port = parse_address(address)
        self.socket: socket.socket = bind_tcp(host, port, backlog)
        self._render = render
        self._loop = asyncio.new_event_loop()
        self._stopped = asyncio.Event()

    def run(self) -> None:
        loop = self._loop
        try:
            loop.run_until_complete(self._serve())
            tasks = asyncio.all_tasks(loop)  # scrapes under way: cancelled
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        finally:
            loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(
            _handler(self._render), sock=self.socket, limit=MAX_HEAD
        )
        await self._stopped.wait()
        server.close()

    def stop(self) -> None:
        """Close the endpoint and wait for the thread (a started one)."""
        self._loop.call_soon_threadsafe(self._stopped.set)
        self.join()
