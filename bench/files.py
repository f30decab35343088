"""File downloads, for several server commands side by side.

    python bench/files.py [--duration 10] [--warmup 2] [--rounds 1] [--memory]
                          NAME 'SERVER COMMAND' [NAME 'COMMAND' ...]

Each COMMAND may use `{host}`, `{port}` and `{app}`; it runs through `bash -c` from this
directory (`bench/`, on `PYTHONPATH`, so `{app}` = `file_apps:starlette` or `file_apps:pathsend`
resolves) with `BENCH_FILE` naming the file to serve, pinned to `$SERVER_CPU` (default 1); wrk
runs on `$CLIENT_CPU` (default 0). Scenarios, each on a freshly started server:

- `file-starlette`: wrk -t1 -c64, GET of a 1 MiB file through Starlette's `FileResponse`;
- `file-starlette-stat`: the same with the file's stat given to `FileResponse`, which then
  makes no thread hop per request (it otherwise runs `os.stat` in anyio's worker threads);
- `file-pathsend`: the same through a raw ASGI app (`http.response.pathsend` where offered);
- with `--memory`, `file-memory`: 64 connections downloading a 100 MiB file through
  `FileResponse` for `--duration` s; the server's RSS (its process tree) is sampled every
  0.2 s: `base_kib` before, `peak_kib` during, `growth_kib` the difference.

Each line ends with `log_errors=N`, the lines of the server's log that report an error or a
traceback during that measurement (the first three go to stderr): a load run is only good if
the server logged none.

One line per server and scenario, in the shared harness's format
(`NAME SCENARIO req_per_s p50_ms p99_ms errors key=value...`, `MB/s=` among the extras), then
a table of the medians over the rounds with the first NAME's ratio to each other server. With
several rounds the server order alternates. Needs wrk, and the harness's `tools/benchutil.py`
(`$BENCH_DIR`, default `../shared/bench` beside this repository).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_DIR = Path(os.environ.get("BENCH_DIR", HERE.parents[1] / "shared" / "bench")).resolve()
sys.path.insert(0, str(BENCH_DIR / "tools"))
from benchutil import free_port, parse_wrk, rss_kib  # noqa: E402

HOST = "127.0.0.1"
SERVER_CPU = os.environ.get("SERVER_CPU", "1")
CLIENT_CPU = os.environ.get("CLIENT_CPU", "0")
SCENARIOS = {  # name: (app, file size)
    "file-starlette": ("file_apps:starlette", 1 << 20),
    "file-starlette-stat": ("file_apps:starlette_stat", 1 << 20),
    "file-pathsend": ("file_apps:pathsend", 1 << 20),
    "file-memory": ("file_apps:starlette", 100 << 20),
}


def start(
    command: str, app: str, path: Path, logs: Path, name: str
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = command.format(host=HOST, port=port, app=app)
    env = {**os.environ, "PYTHONPATH": str(HERE), "BENCH_FILE": str(path)}
    log = open(logs / f"{name}-{app.split(':')[1]}.log", "ab")  # noqa: SIM115 - the server's
    server = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, "bash", "-c", f"exec {command}"],
        cwd=HERE,
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((HOST, port)) == 0:
                return server, port
        if server.poll() is not None:
            raise SystemExit(f"{name}: the server exited ({logs})")
        time.sleep(0.1)
    stop(server)
    raise SystemExit(f"{name}: the server did not start in 30 s ({logs})")


def stop(server: subprocess.Popen[bytes]) -> None:
    with_group = os.getpgid(server.pid)
    os.killpg(with_group, signal.SIGTERM)
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(with_group, signal.SIGKILL)
        server.wait(10)


def wrk(port: int, seconds: float, out: Path, server: subprocess.Popen[bytes]) -> int:
    """Run wrk for `seconds` against the server; the peak RSS of its process tree meanwhile."""
    command = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", "-c64", f"-d{max(1, round(seconds))}s"]
    command += ["--latency", "--timeout", "10s", f"http://{HOST}:{port}/"]
    peak = 0
    with open(out, "wb") as output:
        load = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        while load.poll() is None:
            peak = max(peak, rss_kib(server.pid))
            time.sleep(0.2)
    return peak


def measure(name: str, command: str, scenario: str, args: argparse.Namespace, work: Path) -> str:
    app, size = SCENARIOS[scenario]
    path = work / f"{size}.bin"
    if not path.exists():
        path.write_bytes(os.urandom(size))
    log = work / f"{name}-{app.split(':')[1]}.log"
    logged = log.stat().st_size if log.exists() else 0
    server, port = start(command, app, path, work, name)
    try:
        if args.warmup:
            wrk(port, args.warmup, work / "warmup.txt", server)
        base = rss_kib(server.pid)
        out = work / f"{name}-{scenario}.txt"
        peak = wrk(port, args.duration, out, server)
    finally:
        stop(server)
    line = f"{name} {scenario} {parse_wrk(out)}"
    if scenario == "file-memory":
        line += f" base_kib={base} peak_kib={peak} growth_kib={peak - base}"
    errors = _errors(log, logged)
    for error in errors[:3]:  # the server's log goes with the scratch directory: show them
        print(f"{name} {scenario}: {error}", file=sys.stderr)
    return line + f" log_errors={len(errors)}"


def _errors(log: Path, offset: int) -> list[str]:
    """The lines from `offset` on of a server's log that report an error or a traceback."""
    with open(log, "rb") as file:
        file.seek(offset)
        lines = file.read().decode(errors="replace").splitlines()
    return [line for line in lines if "ERROR" in line or line.startswith("Traceback")]


def table(lines: list[str], names: list[str], scenarios: list[str]) -> str:
    """Median req/s per server and scenario, with the first server's ratio to each other
    (for file-memory also the RSS growth in KiB, without ratios)."""
    ratios = [f"{names[0]}/{name}" for name in names[1:]]
    rows = [
        "| scenario | " + " | ".join(names + ratios) + " |",
        "|---" * (1 + len(names) + len(ratios)) + "|",
    ]
    for scenario in scenarios:
        values = [_median(lines, name, scenario, 2) for name in names]
        cells = [f"{value:,.0f}" for value in values]
        cells += [f"{values[0] / value:.2f}" if value else "-" for value in values[1:]]
        rows.append(f"| {scenario} req/s | " + " | ".join(cells) + " |")
        if scenario == "file-memory":
            growth = [f"{_median(lines, name, scenario, None):,.0f}" for name in names]
            rows.append(
                "| file-memory RSS growth KiB | " + " | ".join(growth + ["-"] * len(ratios)) + " |"
            )
    return "\n".join(rows)


def _median(lines: list[str], name: str, scenario: str, column: int | None) -> float:
    """The median of a column (None: `growth_kib=`) of `name`'s `scenario` lines."""
    numbers = []
    for line in lines:
        fields = line.split()
        if fields[:2] != [name, scenario] or fields[2] == "fail":
            continue
        if column is not None:
            numbers.append(float(fields[column]))
        else:
            numbers += [float(f.split("=")[1]) for f in fields if f.startswith("growth_kib=")]
    return statistics.median(numbers) if numbers else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="also run file-memory")
    parser.add_argument("servers", nargs="+", help="NAME 'COMMAND' pairs")
    args = parser.parse_args()
    if len(args.servers) % 2:
        parser.error("servers come as NAME 'COMMAND' pairs")
    servers = list(zip(args.servers[::2], args.servers[1::2], strict=True))
    scenarios = ["file-starlette", "file-starlette-stat", "file-pathsend"]
    scenarios += ["file-memory"] if args.memory else []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-files.") as scratch:
        work = Path(scratch)
        for round_number in range(args.rounds):
            order = servers if round_number % 2 == 0 else servers[::-1]
            for scenario in scenarios:
                for name, command in order:
                    line = measure(name, command, scenario, args, work)
                    print(line, flush=True)
                    lines.append(line)
    print()
    print(table(lines, [name for name, _ in servers], scenarios))


if __name__ == "__main__":
    main()
