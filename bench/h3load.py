"""An HTTP/3 load generator: GET one URL on N QUIC connections x M concurrent streams.

    python bench/h3load.py [-c 16] [-m 16] [--duration 10] [--warmup 2] [--timeout 10]
                           [--stack aioquic|qh3] [--server-pid PID] [--probe] https://HOST:PORT/PATH

Debian's h2load (nghttp2 1.52) is built without ngtcp2/nghttp3: with `--npn-list=h3` it still
connects over TCP+TLS, offers ALPN `h3` and gets no protocol. So this client drives a sans-I/O
QUIC stack itself from one epoll loop over connected UDP sockets (no asyncio): aioquic (default)
or qh3 (aioquic's API over a native core: it took 40% of aioquic's CPU per response here, but
sends more ACK packets, which the server pays for). Per wake-up the loop reads every datagram
waiting on each ready socket, counts the completed responses and sends a new request for each,
then flushes once, so the requests of one wake-up share packets; a connection that got data but
completed nothing is not flushed before its ACK timer (at most 1 ms in aioquic). HTTP/3 is done
by hand on the request streams: one prebuilt HEADERS frame per GET (QPACK without a dynamic
table; the client's SETTINGS allow the server none either, so each header block decodes on its
own), and a response is read whole at the end of its stream (`:status`, DATA bytes): keep the
bodies small. The stack's `H3Connection` only serves the control and QPACK streams. The
certificate is not verified.

Phases: the handshakes (4 at a time; at most `--timeout` s), `--warmup` s of load whose
responses are not counted, then `--duration` s measured: the requests that complete in that
window. A lost connection is counted and replaced (at most every 0.1 s); the run stops after
`--duration` whatever happens, and at `warmup + duration + 2 x timeout` s at the latest. Exit
status 1 when no connection could be set up (nothing on the port: refused at once; a silent
port: after `--timeout` s).

Output, one line: `req_per_s p50_ms p99_ms errors key=value...` (the shared harness's format
without `NAME SCENARIO`). `errors` = non-200 or unreadable responses + reset or lost streams +
lost connections (`err=s/r/c`); `total=` the 200 responses in the window, `body_bytes=` their
mean body size, `dgrams_in=`/`dgrams_out=` UDP datagrams received/sent per 200 response (how
well each side packs), then the CPU split over the window: `cli_cpu=` (this process) and, with
`--server-pid`, `srv_cpu=`/`srv_sys=` (the server's process tree; kernel share), `oth_cpu=`
(everything else) and `cpus=` busy% per CPU, as the harness's `tools/benchutil.py`
(`$BENCH_DIR`, default `../shared/bench`) computes them; 100% is one core. With `--probe`: one
connection, one GET; prints the status and body size (exit 1 if no response came).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
BENCH_DIR = Path(os.environ.get("BENCH_DIR", HERE.parents[1] / "shared" / "bench")).resolve()
RECONNECT_EVERY = 0.1  # s between replacements of lost connections
READ_BATCH = 256  # datagrams read from one socket per wake-up, at most
HANDSHAKES_AT_ONCE = 4
HTTP3_DATA = 0x0  # frame types
HTTP3_HEADERS = 0x1
H3_ALPN = ["h3"]
COUNTS = [0, 0]  # datagrams sent, received


class Stack:
    """The QUIC implementation: `aioquic` (Python, with pylsqpack) or `qh3` (aioquic's API over
    a native core)."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "qh3":
            from qh3 import _hazmat as qpack
            from qh3.h3.connection import H3Connection, Setting, encode_frame
            from qh3.quic import events
            from qh3.quic.configuration import QuicConfiguration
            from qh3.quic.connection import QuicConnection

            self.decoder = lambda: qpack.QpackDecoder(0, 0)
            self.encoder = qpack.QpackEncoder
            self.stream_limit: Any = lambda quic: quic.max_concurrent_bidi_streams
        else:
            import pylsqpack as qpack
            from aioquic.h3.connection import H3Connection, Setting, encode_frame
            from aioquic.quic import events
            from aioquic.quic.configuration import QuicConfiguration
            from aioquic.quic.connection import QuicConnection

            self.decoder = lambda: qpack.Decoder(0, 0)
            self.encoder = qpack.Encoder
            self.stream_limit = None  # aioquic holds streams past the limit back itself
        self.qpack_errors = (qpack.DecompressionFailed, qpack.StreamBlocked)
        self.QuicConfiguration = QuicConfiguration
        self.QuicConnection = QuicConnection
        self.encode_frame = encode_frame
        self.StreamDataReceived = events.StreamDataReceived
        self.StreamReset = events.StreamReset
        self.HandshakeCompleted = events.HandshakeCompleted
        self.ConnectionTerminated = events.ConnectionTerminated
        self.many = hasattr(QuicConnection, "receive_many_datagrams")

        def local_settings(h3: Any) -> dict[int, int]:
            settings: dict[int, int] = H3Connection._get_local_settings(h3)
            settings[Setting.QPACK_MAX_TABLE_CAPACITY] = 0
            settings[Setting.QPACK_BLOCKED_STREAMS] = 0
            return settings

        # the HTTP/3 connection serves the control and QPACK streams only; it offers no QPACK
        # dynamic table, so the server's header blocks decode on their own
        self.ControlStreams = type(
            "ControlStreams", (H3Connection,), {"_get_local_settings": local_settings}
        )


def default_stack() -> str:
    """aioquic where installed (the stack of the servers measured so far), else qh3."""
    try:
        import aioquic  # noqa: F401
    except ImportError:
        return "qh3"
    return "aioquic"


class NoConnection(Exception):
    """Not one QUIC handshake completed."""


class Conn:
    """One QUIC connection with its UDP socket and its requests in flight."""

    __slots__ = (
        "address",
        "decoder",
        "h3",
        "inflight",
        "many",
        "partial",
        "quic",
        "ready",
        "sick",
        "sock",
        "timer",
    )

    def __init__(self, stack: Stack, config: Any, address: tuple[str, int], now: float) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        self.sock.connect(address)
        self.quic = stack.QuicConnection(configuration=config)
        self.h3 = stack.ControlStreams(self.quic)
        self.decoder = stack.decoder()
        self.inflight: dict[int, float] = {}  # stream id -> start time
        self.partial: dict[int, bytes] = {}  # stream id -> response bytes so far
        self.many = stack.many
        self.ready = False  # handshake done
        self.sick = False  # refused or terminated: to be replaced
        self.timer: float | None = None
        self.quic.connect(address, now=now)
        self.flush(now)

    def flush(self, now: float) -> None:
        send = self.sock.send
        try:
            for data, _ in self.quic.datagrams_to_send(now=now):
                send(data)
                COUNTS[0] += 1
        except BlockingIOError:
            pass  # a full socket buffer drops the datagram: QUIC retransmits it
        except OSError:
            self.sick = True
        self.timer = self.quic.get_timer()

    def read(self, now: float) -> None:
        """Feed the waiting datagrams to the connection (in one call where the stack can)."""
        recv = self.sock.recv
        datagrams = []
        for _ in range(READ_BATCH):
            try:
                datagrams.append(recv(65536))
            except BlockingIOError:
                break
            except OSError:  # ECONNREFUSED: nothing listens on the port (ICMP)
                self.sick = True
                break
        if not datagrams:
            return
        COUNTS[1] += len(datagrams)
        if len(datagrams) > 1 and self.many:
            self.quic.receive_many_datagrams(datagrams, self.address, now)
        else:
            receive = self.quic.receive_datagram
            for data in datagrams:
                receive(data, self.address, now)

    def close(self) -> None:
        try:
            self.quic.close()
            self.flush(time.monotonic())
        finally:
            self.sock.close()


def parse_response(
    decoder: Any, errors: tuple[type, ...], stream_id: int, data: bytes
) -> tuple[bytes | None, int]:
    """The `:status` (None if unreadable) and the body's size (the DATA frames' payload) of a
    whole response stream."""
    status = None
    body = 0
    pos, end = 0, len(data)
    try:
        while pos < end:
            frame_type, pos = _varint(data, pos)
            length, pos = _varint(data, pos)
            if frame_type == HTTP3_DATA:
                body += length
            elif frame_type == HTTP3_HEADERS and status is None:
                _, headers = decoder.feed_header(stream_id, data[pos : pos + length])
                name, value = headers[0]
                status = value if name == b":status" else b"?"
            pos += length  # trailers and reserved frame types are skipped
    except (IndexError, ValueError, *errors):
        return None, body
    return status, body


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    size = 1 << (data[pos] >> 6)
    value = data[pos] & 0x3F
    for byte in data[pos + 1 : pos + size]:
        value = (value << 8) | byte
    if pos + size > len(data):
        raise ValueError("truncated varint")
    return value, pos + size


class Load:
    """The request loop's settings and counters."""

    def __init__(self, stack: Stack, url: str, streams: int, timeout: float) -> None:
        self.stack = stack
        parts = urlsplit(url if "//" in url else f"https://{url}")
        self.address = (parts.hostname or "127.0.0.1", parts.port or 443)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", parts.netloc.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"h3load"),
        ]
        # no dynamic table (the encoder has none until told the peer's settings): the same
        # HEADERS frame serves every request
        _, block = stack.encoder().encode(0, headers)
        self.request = stack.encode_frame(HTTP3_HEADERS, block)
        self.config = stack.QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            verify_mode=ssl.CERT_NONE,
            server_name=parts.hostname,
            idle_timeout=max(30.0, timeout),
        )
        self.streams = streams
        self.sending = False
        self.limit = 0  # stop after this many responses (0: no limit)
        self.last: tuple[bytes, int] | None = None  # status, body size
        self.ok = self.bad_status = self.resets = self.lost = self.body_bytes = 0
        self.latencies: list[float] = []

    def process(self, conn: Conn, now: float, urgent: bool = False) -> None:
        """Handle the connection's pending events and top up its requests. Flush if requests
        went out, the handshake is not done or `urgent` (a timer fired); otherwise what is due
        (ACKs) waits for the connection's timer (1 ms or less in aioquic), which lets the
        packets that arrive meanwhile share one flush."""
        quic = conn.quic
        inflight = conn.inflight
        partial = conn.partial
        stack = self.stack
        was_ready = conn.ready
        data_received = stack.StreamDataReceived
        while (event := quic.next_event()) is not None:
            kind = type(event)
            if kind is data_received:
                stream_id = event.stream_id
                if stream_id & 2:  # unidirectional: the server's control and QPACK streams
                    conn.h3.handle_event(event)
                    continue
                data = event.data
                if stream_id in partial:
                    data = partial.pop(stream_id) + data
                if not event.end_stream:
                    partial[stream_id] = data
                    continue
                start = inflight.pop(stream_id, None)
                if start is None:
                    continue
                status, body = parse_response(conn.decoder, stack.qpack_errors, stream_id, data)
                if status == b"200":
                    self.ok += 1
                    self.body_bytes += body
                    self.latencies.append(now - start)
                else:
                    self.bad_status += 1
                self.last = (status or b"?", body)
            elif kind is stack.StreamReset:
                conn.partial.pop(event.stream_id, None)
                if inflight.pop(event.stream_id, None) is not None:
                    self.resets += 1
            elif kind is stack.HandshakeCompleted:
                conn.ready = True
            elif kind is stack.ConnectionTerminated:
                conn.sick = True
        room = 0
        if self.sending and conn.ready and not conn.sick:
            request = self.request
            send = quic.send_stream_data
            next_id = quic.get_next_available_stream_id
            room = self.streams - len(inflight)
            if stack.stream_limit:  # qh3 refuses to open streams past the peer's limit
                room = min(room, stack.stream_limit(quic) - next_id() // 4)
            for _ in range(room):
                stream_id = next_id()
                send(stream_id, request, True)
                inflight[stream_id] = now
        if room > 0 or urgent or not was_ready:
            conn.flush(now)
        else:
            conn.timer = quic.get_timer()

    def reset_counters(self) -> None:
        self.ok = self.bad_status = self.resets = self.lost = self.body_bytes = 0
        self.latencies = []


def run(
    load: Load,
    connections: int,
    warmup: float,
    duration: float,
    timeout: float,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Handshakes, warm-up, the measured window: returns the window's bounds and CPU snapshots
    (the counters are in `load`). Raises NoConnection when no handshake completed."""
    selector = selectors.EpollSelector()
    start = time.monotonic()
    hard_deadline = start + warmup + duration + 2 * timeout
    conns: list[Conn] = []

    def open_conn(now: float) -> None:
        conn = Conn(load.stack, load.config, load.address, now)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        conns.append(conn)

    def drop(conn: Conn) -> None:
        selector.unregister(conn.sock)
        conn.sock.close()
        conns.remove(conn)

    phase = "handshake"
    phase_end = start + timeout
    window: dict[str, Any] = {}
    last_reconnect = start
    try:
        while True:
            now = time.monotonic()
            if now >= hard_deadline:
                window["aborted"] = True
                break
            if load.limit and load.ok + load.bad_status >= load.limit:
                break
            if phase == "handshake":  # a few at a time: a burst of them overflows some servers
                pending = sum(not (c.ready or c.sick) for c in conns)
                while len(conns) < connections and pending < HANDSHAKES_AT_ONCE:
                    open_conn(now)
                    pending += 1
            if phase == "handshake" and (
                now >= phase_end or (len(conns) == connections and not pending)
            ):
                ready = sum(c.ready for c in conns)
                if not ready:
                    why = "refused" if any(c.sick for c in conns) else f"no answer in {timeout} s"
                    raise NoConnection(f"no QUIC connection to {load.address} ({why})")
                window["handshake_s"] = now - start
                window["ready"] = ready
                phase, phase_end = "warmup", now + warmup
                load.sending = True
                for conn in conns:
                    load.process(conn, now)
                continue
            if phase == "warmup" and now >= phase_end:
                load.reset_counters()
                window["t0"] = now
                window["snap0"] = cpu_snapshot(server_pid)
                phase, phase_end = "measure", now + duration
                continue
            if phase == "measure" and now >= phase_end:
                window["t1"] = now
                window["snap1"] = cpu_snapshot(server_pid)
                break
            # replace lost connections (not during the handshake)
            if phase != "handshake":
                for conn in [c for c in conns if c.sick]:
                    load.lost += 1
                    load.resets += len(conn.inflight)  # its requests in flight are lost too
                    drop(conn)
                if len(conns) < connections and now - last_reconnect >= RECONNECT_EVERY:
                    last_reconnect = now
                    for _ in range(connections - len(conns)):
                        open_conn(now)
            wake = phase_end
            for conn in conns:
                timer = conn.timer
                if timer is not None:
                    if timer <= now:
                        conn.quic.handle_timer(now=now)
                        load.process(conn, now, urgent=True)
                        timer = conn.timer
                    if timer is not None and timer < wake:
                        wake = timer
            if phase != "handshake" and len(conns) < connections:
                wake = min(wake, last_reconnect + RECONNECT_EVERY)
            ready_keys = selector.select(max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            for key, _ in ready_keys:
                conn = key.data
                conn.read(now)
                load.process(conn, now)
    finally:
        window.setdefault("t1", time.monotonic())
        load.sending = False
        for conn in list(conns):
            selector.unregister(conn.sock)
            conn.close()
        selector.close()
    return window


def cpu_snapshot(server_pid: int | None) -> dict[str, Any]:
    """This process's CPU seconds, and with a server PID the harness's tick counters."""
    times = os.times()
    snap: dict[str, Any] = {
        "self": times.user + times.system,
        "time": time.monotonic(),
        "datagrams": tuple(COUNTS),
    }
    if server_pid:
        import benchutil

        utime, stime = benchutil.cputicks(server_pid, split=True)
        snap.update(
            srv=utime + stime,
            srv_sys=stime,
            self_ticks=benchutil.cputicks(os.getpid()),
            all=benchutil.cputicks_all(),
            cpus=benchutil.cpustat(),
        )
    return snap


def cpu_extras(snap0: dict[str, Any], snap1: dict[str, Any]) -> list[str]:
    elapsed = max(snap1["time"] - snap0["time"], 0.01)
    extras = [f"cli_cpu={100 * (snap1['self'] - snap0['self']) / elapsed:.0f}%"]
    if "srv" not in snap0:
        return extras
    import benchutil

    tick = benchutil.CLK_TCK
    server = snap1["srv"] - snap0["srv"]
    client = snap1["self_ticks"] - snap0["self_ticks"]
    # other processes: those alive at both snapshots, or (catching short-lived ones) the
    # machine's busy time less softirq, server and client, whichever is larger
    others = max(0, snap1["all"] - snap0["all"] - server - client)
    busy_all = 0
    cpus = []
    before = {}
    for line in snap0["cpus"].split("\n"):
        name, *values = line.split()
        before[name] = [int(v) for v in values]
    for line in snap1["cpus"].split("\n"):
        name, *values = line.split()
        if name in before:
            pairs = zip(values, before[name], strict=True)
            busy, total, steal, softirq = (int(v) - b for v, b in pairs)
            busy_all += busy - softirq
            total = max(1, total)
            cpus.append(
                f"{name}={100 * busy / total:.0f}%"
                + (f"/si{100 * softirq / total:.0f}%" if softirq else "")
                + (f"/st{100 * steal / total:.0f}%" if steal else "")
            )
    others = max(others, busy_all - server - client)
    sys_share = 100 * (snap1["srv_sys"] - snap0["srv_sys"]) / server if server else 0
    return [
        f"srv_cpu={100 * server / tick / elapsed:.0f}%",
        f"srv_sys={sys_share:.0f}%",
        *extras,
        f"oth_cpu={100 * others / tick / elapsed:.0f}%",
        f"cpus={','.join(cpus)}",
    ]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def probe(url: str, timeout: float, stack: str = "") -> tuple[bytes, int] | None:
    """One GET on one new connection: the response's status and body size, or None (within
    `timeout` s)."""
    load = Load(Stack(stack or default_stack()), url, 1, timeout)
    load.limit = 1
    try:
        run(load, 1, 0.0, timeout, timeout / 2)
    except (NoConnection, OSError):
        return None
    return load.last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="https://HOST:PORT/PATH (or HOST:PORT)")
    parser.add_argument("-c", "--connections", type=int, default=16)
    parser.add_argument("-m", "--streams", type=int, default=16, help="per connection")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="handshakes, probe")
    parser.add_argument("--server-pid", type=int, help="report the server tree's CPU use")
    parser.add_argument("--probe", action="store_true", help="one GET, print the status")
    parser.add_argument(
        "--stack", choices=["aioquic", "qh3"], default=default_stack(), help="default: %(default)s"
    )
    args = parser.parse_args()
    if args.probe:
        answer = probe(args.url, args.timeout, args.stack)
        if answer is None:
            sys.exit("none")
        print(f"{answer[0].decode(errors='replace')} body_bytes={answer[1]}")
        return
    if args.server_pid:
        sys.path.insert(0, str(BENCH_DIR / "tools"))
    load = Load(Stack(args.stack), args.url, args.streams, args.timeout)
    try:
        window = run(
            load, args.connections, args.warmup, args.duration, args.timeout, args.server_pid
        )
    except NoConnection as exc:
        sys.exit(f"h3load: {exc}")
    if "t0" not in window:
        sys.exit("h3load: aborted before the measured window")
    elapsed = window["t1"] - window["t0"]
    latencies = sorted(load.latencies)
    errors = load.bad_status + load.resets + load.lost
    extras = [
        f"err=s{load.bad_status}/r{load.resets}/c{load.lost}",
        f"total={load.ok}",
        f"body_bytes={load.body_bytes / max(1, load.ok):.1f}",
        f"conns={window['ready']}/{args.connections}x{args.streams}",
        f"handshake_ms={1000 * window['handshake_s']:.0f}",
        f"stack={args.stack}",
    ]
    if "snap1" in window:
        sent, received = (
            b - a
            for a, b in zip(*(window[k]["datagrams"] for k in ("snap0", "snap1")), strict=True)
        )
        per = max(1, load.ok)
        extras += [f"dgrams_in={received / per:.2f}", f"dgrams_out={sent / per:.2f}"]
        extras += cpu_extras(window["snap0"], window["snap1"])
    if window.get("aborted"):
        extras.append("aborted")
    print(
        f"{load.ok / elapsed:.0f} {1000 * percentile(latencies, 0.5):.3f} "
        f"{1000 * percentile(latencies, 0.99):.3f} {errors} " + " ".join(extras),
        flush=True,
    )


if __name__ == "__main__":
    main()
