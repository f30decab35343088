"""Server memory per idle open WebSocket, for several server commands side by side.

    python bench/ws_idle.py [--n 2000] [--rounds 1] NAME 'SERVER COMMAND' [NAME 'COMMAND' ...]

Each COMMAND may use `{host}` and `{port}`; it runs through `bash -c` from the shared harness
directory (`$BENCH_DIR`, default `../shared/bench` beside this repository) with `PYTHONPATH`
pointing there, so `apps:app` resolves (any WebSocket goes to its echo app), pinned to
`$SERVER_CPU` (default 1) with `taskset` when available. For each server, once per round:

1. start it, wait (at most `--startup-timeout` s) until the port accepts connections;
2. warm it: a few echo round trips on a few WebSockets, then close them; wait `--settle` s and
   read the baseline RSS of the server's process tree (`rss_kib` of the harness's benchutil);
3. open `--n` WebSockets (raw handshake, at most `--concurrency` in flight) and exchange one
   message on each, so every connection is fully established in the app;
4. wait `--settle` s, read the RSS again, count the connections still open, print

       NAME ws-idle kib_per_conn=... base_kib=... after_kib=... alive=... n=... open_s=...
       failures=...

   (one line), with kib_per_conn = (after_kib - base_kib) / alive: lower is better;
5. close the connections, stop the server (SIGTERM to its process group, SIGKILL after 10 s).

Opening stops after `--open-timeout` s, or when no connection completed for `--stall` s;
unanswered connections count as failures. Each measurement is bounded by `--deadline` s. With
several rounds the server order alternates, and `#` lines give the median per server at the
end. The client runs on `$CLIENT_CPU` (default 0) with uvloop when importable. Server pings
(every 20 s by default in fulmen and uvicorn) do not fall into the measurement window.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(
    os.environ.get("BENCH_DIR", Path(__file__).resolve().parents[2] / "shared" / "bench")
).resolve()
sys.path.insert(0, str(BENCH_DIR / "tools"))
from benchutil import free_port, rss_kib, tree  # noqa: E402

HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STOP_GRACE = 10.0
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (FIN set); payloads here are always shorter than 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next frame from the server."""
    b0, b1 = await reader.readexactly(2)
    length = b1 & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    mask = await reader.readexactly(4) if b1 & 0x80 else b""
    payload = await reader.readexactly(length)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload


async def open_ws(port: int) -> Conn:
    """Connect and complete the opening handshake on `/`."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (HOST.encode(), port, key)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            status = head.split(b"\r\n", 1)[0]
            raise ValueError(f"handshake refused: {status!r}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def echo(conn: Conn, text: bytes) -> None:
    reader, writer = conn
    writer.write(frame(0x1, text))
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == 0x9:  # ping
            writer.write(frame(0xA, payload))
        elif opcode == 0x8:
            raise ConnectionError("closed by the server")
        elif payload == text:
            return


async def watch(conn: Conn) -> None:
    """Return when the server closes the connection; answer pings meanwhile."""
    reader, writer = conn
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == 0x9:
                writer.write(frame(0xA, payload))
            elif opcode == 0x8:
                return


async def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        if not writer.is_closing():
            writer.write(frame(0x8, (1000).to_bytes(2, "big")))
            writer.close()
    await asyncio.sleep(0.2)


async def warm(port: int, conns: int = 4, messages: int = 50) -> None:
    opened: list[Conn] = []
    try:
        for _ in range(conns):
            opened.append(await asyncio.wait_for(open_ws(port), 15))
        for i in range(messages):
            await asyncio.wait_for(asyncio.gather(*(echo(c, b"warm %d" % i) for c in opened)), 15)
    finally:
        await close_all(opened)


@dataclass
class Result:
    base: int
    after: int
    alive: int
    open_s: float
    failures: int

    @property
    def per_conn(self) -> float:
        return (self.after - self.base) / self.alive if self.alive else float("nan")


async def measure(pid: int, port: int, a: argparse.Namespace) -> Result:
    await warm(port)
    await asyncio.sleep(a.settle)
    base = rss_kib(pid)
    sem = asyncio.Semaphore(a.concurrency)
    conns: list[Conn] = []

    async def open_one(i: int) -> None:
        async with sem:
            conn = await asyncio.wait_for(open_ws(port), 15)
            try:
                await asyncio.wait_for(echo(conn, b"hello %d" % i), 15)
            except BaseException:
                conn[1].close()
                raise
            conns.append(conn)

    t0 = time.monotonic()
    pending = {asyncio.ensure_future(open_one(i)) for i in range(a.n)}
    tasks = list(pending)
    watchers: list[asyncio.Future[None]] = []
    try:
        last_progress = t0
        while pending and time.monotonic() - t0 < a.open_timeout:
            done, pending = await asyncio.wait(pending, timeout=0.5)
            now = time.monotonic()
            if done:
                last_progress = now
            elif now - last_progress > a.stall:
                break
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        failures = sum(1 for t in tasks if not t.done() or t.cancelled() or t.exception())
        open_s = time.monotonic() - t0
        watchers = [asyncio.ensure_future(watch(c)) for c in conns]
        await asyncio.sleep(a.settle)
        after = rss_kib(pid)
        alive = sum(1 for w in watchers if not w.done())
    finally:  # also on cancellation (--deadline)
        for t in [*tasks, *watchers]:
            t.cancel()
        await asyncio.wait([*tasks, *watchers], timeout=5)
        await close_all(conns)
    return Result(base, after, alive, open_s, failures)


def pin(cpu: int) -> bool:
    return hasattr(os, "sched_getaffinity") and cpu in os.sched_getaffinity(0)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def start(command: str, port: int, log: Path, startup_timeout: float) -> subprocess.Popen[bytes]:
    """Start COMMAND in its own process group, pinned, and wait until the port accepts."""
    cmd = command.replace("{host}", HOST).replace("{port}", str(port))
    script = f'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec {cmd}'
    argv = ["bash", "-c", script]
    server_cpu = int(os.environ.get("SERVER_CPU", "1"))
    if shutil.which("taskset") and pin(server_cpu):
        argv = ["taskset", "-c", str(server_cpu), *argv]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=BENCH_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + startup_timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if proc.returncode is not None else "did not open its port"
            stop(proc)
            raise RuntimeError(f"server {why} (log: {log})")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after 10 s."""
    pids = tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline and any(running(p) for p in pids):
        proc.poll()  # reaps the server itself once it exits
        time.sleep(0.1)
    if any(running(p) for p in pids):
        print(f"# pid {proc.pid} still alive after SIGTERM: SIGKILL", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_one(name: str, command: str, a: argparse.Namespace, logdir: Path) -> Result | None:
    port = free_port()
    try:
        proc = start(command, port, logdir / f"{name}.log", a.startup_timeout)
    except RuntimeError as exc:
        print(f"{name} ws-idle fail {exc}", flush=True)
        return None
    try:
        return run_async(asyncio.wait_for(measure(proc.pid, port, a), a.deadline))
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        print(f"{name} ws-idle fail {type(exc).__name__}: {str(exc) or 'timed out'}", flush=True)
        return None
    finally:
        stop(proc)


def raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            print(f"# fd limit {new} < {want}: some connections may fail", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("servers", nargs="+", metavar="NAME COMMAND")
    ap.add_argument("--n", type=int, default=2000, help="WebSockets to open (default 2000)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds before each RSS read")
    ap.add_argument("--open-timeout", type=float, default=60.0)
    ap.add_argument("--stall", type=float, default=5.0)
    ap.add_argument("--startup-timeout", type=float, default=30.0)
    ap.add_argument("--deadline", type=float, default=150.0, help="bound of one measurement")
    a = ap.parse_args()
    if len(a.servers) % 2:
        ap.error("expected NAME COMMAND pairs")
    servers = list(zip(a.servers[::2], a.servers[1::2], strict=True))
    raise_fd_limit(a.n)
    client_cpu = int(os.environ.get("CLIENT_CPU", "0"))
    if pin(client_cpu) and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {client_cpu})
    results: dict[str, list[float]] = {name: [] for name, _ in servers}
    logdir = Path(tempfile.mkdtemp(prefix="ws-idle."))
    print(f"# n={a.n} server logs: {logdir}", file=sys.stderr)
    for r in range(a.rounds):
        for name, command in servers if r % 2 == 0 else servers[::-1]:
            res = run_one(name, command, a, logdir)
            if res is None:
                continue
            results[name].append(res.per_conn)
            print(
                f"{name} ws-idle kib_per_conn={res.per_conn:.2f} base_kib={res.base} "
                f"after_kib={res.after} alive={res.alive} n={a.n} open_s={res.open_s:.2f} "
                f"failures={res.failures}",
                flush=True,
            )
    if a.rounds > 1:
        for name, values in results.items():
            if values:
                median = statistics.median(values)
                print(f"# {name} median kib_per_conn={median:.2f} over {len(values)} rounds")


if __name__ == "__main__":
    main()
