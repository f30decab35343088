"""HTTP/3 requests per second, for several server commands side by side.

    python bench/h3.py [--duration 10] [--warmup 2] [--rounds 1] [-c 16] [-m 16]
                       [--stack aioquic|qh3] [--client-python PY] NAME 'SERVER COMMAND' [...]

Each COMMAND may use `{host}`, `{port}`, `{app}`, `{certfile}` and `{keyfile}`: it must serve
HTTP/3 (QUIC, UDP) on `{host}:{port}` with that certificate (a self-signed one made for the run,
for `localhost` and 127.0.0.1), and may serve TLS on the TCP port of the same number. It runs
through `bash -c` from this directory (`bench/`, on `PYTHONPATH`, so `{app}` = `h3_apps:hello`
resolves, see `bench/h3_apps.py`), pinned to `$SERVER_CPU` (default 1); the load generator,
`bench/h3load.py` (GET /, `-c` connections x `-m` streams, on aioquic or qh3: Debian's h2load
has no HTTP/3), runs on `$CLIENT_CPU` (default 0).

Per round and server: start the server on a fresh port, wait (at most `--startup-timeout` s)
until a GET over HTTP/3 gets a response, wait (at most 30 s) for a quiet second on the machine,
run the load (`--warmup` s, then `--duration` s measured; killed after `--duration + --warmup +
60` s at the latest), and run it again (at most twice more, keeping the attempt with the least
noise: `tries=`) while other processes used more than 20% of a core meanwhile (`oth_cpu=`; the
machine may be shared), then stop the server (SIGTERM to its PID, SIGKILL to the PIDs of its
process tree still alive after 10 s). With several rounds the order of the servers alternates.

One line per server and round, in the shared harness's format:
`NAME h3-hello req_per_s p50_ms p99_ms errors key=value...` (h3load's extras: the CPU split
`srv_cpu=` `cli_cpu=` `oth_cpu=`, `dgrams_in=`/`dgrams_out=` datagrams per response, ...), then
`log_errors=N` (the server's log lines with an error or a traceback) and `client_bound` when the
load generator used 90% or more of its core while the server used less than 90% of its own (the
number is then the client's limit, not the server's; try `--stack qh3`), `noisy_machine` when
no quiet second came, `server_died` when the server was gone after the load. Then, per round, the
first server's ratio to each other, and a table of the medians over the rounds. Needs the
harness's `tools/benchutil.py` (`$BENCH_DIR`, default `../shared/bench` beside this repository).
"""

from __future__ import annotations

import argparse
import contextlib
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
from benchutil import busy, free_port, tree  # noqa: E402

HOST = "127.0.0.1"
SERVER_CPU = os.environ.get("SERVER_CPU", "1")
CLIENT_CPU = os.environ.get("CLIENT_CPU", "0")
SCENARIO = "h3-hello"
QUIET_MAX = 25  # % of one core: the machine is quiet below this
QUIET_WAIT = 30  # s
NOISE_MAX = 20  # % of one core used by other processes during a measurement
RETRIES = 2


def make_cert(work: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (trustme, else openssl)."""
    certfile, keyfile = work / "cert.pem", work / "key.pem"
    try:
        import trustme
    except ImportError:
        command = ["openssl", "req", "-x509", "-newkey", "ec"]
        command += ["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
        command += ["-keyout", str(keyfile), "-out", str(certfile), "-subj", "/CN=localhost"]
        command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        return certfile, keyfile
    cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(keyfile))
    with open(certfile, "wb") as file:
        for blob in cert.cert_chain_pems:
            file.write(blob.bytes())
    return certfile, keyfile


def free_udp_tcp_port() -> int:
    """A port free for both TCP (benchutil's check) and UDP on HOST."""
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        return port
    raise SystemExit("h3.py: no free port")


def alive(pid: int) -> bool:
    """Is the process running (a zombie is not)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def start(
    command: str, args: argparse.Namespace, work: Path, log: Path
) -> tuple[subprocess.Popen[bytes] | None, int, str]:
    """Start the server and wait until it answers a GET over HTTP/3: (server, port, error)."""
    port = free_udp_tcp_port()
    command = command.format(
        host=HOST, port=port, app=args.app, certfile=args.certfile, keyfile=args.keyfile
    )
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    with open(log, "ab") as output:
        output.write(f"=== {time.strftime('%T')} {command}\n".encode())
        output.flush()
        server = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, "bash", "-c", f"exec {command}"],
            cwd=HERE,
            env=env,
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + args.startup_timeout
    probe = [args.client_python, str(HERE / "h3load.py"), "--probe", "--timeout", "2"]
    probe += ["--stack", args.stack, f"https://{HOST}:{port}{args.path}"]
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return None, port, "server_exited"
        try:
            answer = subprocess.run(probe, capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            continue
        if answer.returncode == 0:
            return server, port, ""
        time.sleep(0.2)
    stop(server)
    return None, port, "no_h3_answer"


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's PID; SIGKILL to its tree's PIDs still alive after 10 s."""
    pids = tree(server.pid)
    with contextlib.suppress(ProcessLookupError):
        server.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        server.poll()  # reaps the server itself once it exits
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            print(f"h3.py: pid {pid} still alive after SIGTERM, sending SIGKILL", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        print(f"h3.py: pid {server.pid} did not exit", file=sys.stderr)


def wait_quiet() -> bool:
    """Wait (at most QUIET_WAIT s) for a second with the machine's CPUs busy < QUIET_MAX %."""
    deadline = time.monotonic() + QUIET_WAIT
    while time.monotonic() < deadline:
        if busy(1) < QUIET_MAX:
            return True
    return False


def measure(name: str, command: str, args: argparse.Namespace, work: Path) -> str:
    """Start the server, load it (again, at most RETRIES times, while other processes used
    more than NOISE_MAX % of a core: the attempt with the least is kept), stop it."""
    log = work / f"{name}.log"
    logged = log.stat().st_size if log.exists() else 0
    server, port, error = start(command, args, work, log)
    if server is None:
        return f"{name} {SCENARIO} fail - - - {error}" + _log_note(name, log, logged)
    attempts: list[str] = []
    try:
        for _ in range(RETRIES + 1):
            quiet = wait_quiet()
            line = load(name, port, server.pid, args)
            attempts.append(line + ("" if quiet else " noisy_machine"))
            if not alive(server.pid) or " fail " in line or _percent(line, "oth_cpu") <= NOISE_MAX:
                break
            if not quiet:  # persistent load: a retry would most likely be just as noisy
                break
        died = not alive(server.pid)
    finally:
        stop(server)
    line = min(attempts, key=lambda a: (" fail " in a, _percent(a, "oth_cpu")))
    line += f" tries={len(attempts)}"
    if died:
        line += " server_died"
    return line + _log_note(name, log, logged)


def load(name: str, port: int, server_pid: int, args: argparse.Namespace) -> str:
    """One run of h3load.py against the server, pinned and bounded: its line."""
    command = [args.client_python, str(HERE / "h3load.py"), f"https://{HOST}:{port}{args.path}"]
    command += ["-c", str(args.connections), "-m", str(args.streams), "--stack", args.stack]
    command += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    command += ["--timeout", "10", "--server-pid", str(server_pid)]
    bound = args.duration + args.warmup + 60
    try:
        result = subprocess.run(
            ["taskset", "-c", CLIENT_CPU, *command],
            capture_output=True,
            timeout=bound,
            env={**os.environ, "BENCH_DIR": str(BENCH_DIR)},
        )
    except subprocess.TimeoutExpired:
        print(f"{name}: h3load killed after {bound} s", file=sys.stderr)
        return f"{name} {SCENARIO} fail - - - h3load_timeout"
    out = result.stdout.decode(errors="replace").strip().splitlines()
    if result.returncode != 0 or not out:
        for text in result.stderr.decode(errors="replace").strip().splitlines()[-3:]:
            print(f"{name}: {text}", file=sys.stderr)
        return f"{name} {SCENARIO} fail - - - h3load_rc={result.returncode}"
    line = f"{name} {SCENARIO} {out[-1]}"
    if _percent(line, "cli_cpu") >= 90 and _percent(line, "srv_cpu") < 90:
        line += " client_bound"
    return line


def _percent(line: str, key: str) -> float:
    for field in line.split():
        if field.startswith(f"{key}="):
            return float(field.split("=")[1].rstrip("%"))
    return float("nan")


def _log_note(name: str, log: Path, offset: int) -> str:
    """` log_errors=N`: the lines from `offset` on of a server's log with an error or a
    traceback (the first three go to stderr: the log goes with the scratch directory)."""
    with open(log, "rb") as file:
        file.seek(offset)
        lines = file.read().decode(errors="replace").splitlines()
    errors = [line for line in lines if "ERROR" in line or line.startswith("Traceback")]
    for error in errors[:3]:
        print(f"{name}: {error}", file=sys.stderr)
    return f" log_errors={len(errors)}"


def _rps(line: str) -> float | None:
    fields = line.split()
    if len(fields) < 3 or fields[2] in ("fail", "-"):
        return None
    return float(fields[2])


def table(lines: list[str], names: list[str], ratios: list[list[float]]) -> str:
    """Median req/s (and p99 ms, errors) per server, with the first server's ratio to each
    other: the ratio of the medians and the median of the per-round ratios."""
    rows = [
        "| server | req/s (median) | p99 ms (median) | errors (sum) | rounds ok | "
        f"{names[0]}/server (ratio of medians) | {names[0]}/server (median of rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    medians = {}
    for name in names:
        mine = [line.split() for line in lines if line.split()[0] == name]
        good = [fields for fields in mine if _rps(" ".join(fields)) is not None]
        rps = statistics.median(float(f[2]) for f in good) if good else float("nan")
        p99 = statistics.median(float(f[4]) for f in good) if good else float("nan")
        errors = sum(int(f[5]) for f in good)
        medians[name] = rps
        rows.append(f"| {name} | {rps:,.0f} | {p99:,.1f} | {errors} | {len(good)}/{len(mine)} |")
    for index, name in enumerate(names):
        if index == 0:
            rows[2] += " - | - |"
            continue
        of_medians = medians[names[0]] / medians[name] if medians[name] else float("nan")
        per_round = [r[index - 1] for r in ratios if r[index - 1] == r[index - 1]]
        of_rounds = statistics.median(per_round) if per_round else float("nan")
        rows[2 + index] += f" {of_medians:.2f} | {of_rounds:.2f} |"
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("-c", "--connections", type=int, default=16)
    parser.add_argument("-m", "--streams", type=int, default=16, help="per connection")
    parser.add_argument("--stack", choices=["aioquic", "qh3"], default="aioquic")
    parser.add_argument(
        "--client-python", default=sys.executable, help="runs h3load.py (default: this one)"
    )
    parser.add_argument("--app", default="h3_apps:hello", help="{app} (default: %(default)s)")
    parser.add_argument("--path", default="/")
    parser.add_argument("--certfile", help="{certfile} (default: a self-signed one)")
    parser.add_argument("--keyfile", help="{keyfile}")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument("servers", nargs="+", help="NAME 'COMMAND' pairs")
    args = parser.parse_args()
    if len(args.servers) % 2:
        parser.error("servers come as NAME 'COMMAND' pairs")
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    servers = list(zip(args.servers[::2], args.servers[1::2], strict=True))
    names = [name for name, _ in servers]
    lines: list[str] = []
    ratios: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-h3.") as scratch:
        work = Path(scratch)
        if not args.certfile:
            args.certfile, args.keyfile = make_cert(work)
        for round_number in range(args.rounds):
            order = servers if round_number % 2 == 0 else servers[::-1]
            results = {}
            for name, command in order:
                line = measure(name, command, args, work)
                print(line, flush=True)
                lines.append(line)
                results[name] = _rps(line)
            first = results[names[0]]
            row = []
            for name in names[1:]:
                other = results[name]
                row.append(first / other if first and other else float("nan"))
            ratios.append(row)
            if len(names) > 1:
                shown = ", ".join(
                    f"{names[0]}/{n} {r:.2f}" for n, r in zip(names[1:], row, strict=True)
                )
                print(f"# round {round_number + 1}: {shown}", flush=True)
    print()
    print(table(lines, names, ratios))


if __name__ == "__main__":
    main()
