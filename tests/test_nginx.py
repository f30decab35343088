"""Fulmen behind a real nginx: two instances on Unix sockets, load-balanced by one nginx.

Each test stack is: two `python -m fulmen tests.apps_nginx:app --uds <dir>/<n>.sock
--forwarded-allow-ips '*'` processes (a Unix socket peer has no address, so `*` is the only
setting that trusts it; the socket's directory is what keeps other clients out), and nginx run
in the foreground as the current user (`-g 'daemon off;'`) with a generated configuration whose
pid file, logs and temporary paths are all inside the stack's temporary directory, listening on
free loopback ports: plain HTTP, and HTTPS when `openssl` can make a self-signed certificate.

The tests show that requests reach both instances, that the application sees the real client
address and the scheme nginx received (not what the client claimed), that a WebSocket passes
through, and that stopping one instance with SIGTERM under load loses no request.
Skipped when nginx is not installed (`.ci/run` installs it where apt-get is available).
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import TIMEOUT
from tests.helpers import STARTED, Fulmen, Lines, clean_env


def _nginx() -> str | None:
    if os.path.exists("/usr/sbin/nginx"):
        return "/usr/sbin/nginx"
    return shutil.which("nginx")


NGINX = _nginx()
OPENSSL = shutil.which("openssl")

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)"),
]

WORKER_STARTED = re.compile(r"start worker process (\d+)")

# The location blocks the documentation recommends (docs/deployment.md, "Behind nginx").
PROXY = """
            proxy_pass http://fulmen;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
            # Retry on another instance when connecting fails (an instance that is stopping has
            # closed its socket) or times out, or when a kept-alive connection is closed under a
            # request that was not answered yet. nginx never retries once a response has begun,
            # nor a POST/PATCH/LOCK already sent (unless `non_idempotent` is added): in-flight
            # requests rely on fulmen's graceful shutdown to be answered.
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
"""

CONFIG = """
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr notice;
events {{
    worker_connections 256;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    upstream fulmen {{
        server unix:{sock_a};
        server unix:{sock_b};
        keepalive 16;
        keepalive_timeout 4s;  # below fulmen's --timeout-keep-alive (5 s)
    }}

    server {{
        listen 127.0.0.1:{port};
        {tls}

        location / {{
            {proxy}
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}

        # nginx is the edge: replace whatever X-Forwarded-For the client sent.
        location /edge/ {{
            {proxy}
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;
        }}

        location /ws {{
            {proxy}
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _certificate(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1, or None without a usable openssl."""
    if OPENSSL is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    result = subprocess.run(
        [
            OPENSSL,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    return (cert, key) if result.returncode == 0 else None


class Nginx:
    """nginx in the foreground (`daemon off`); stopped by the PIDs of its master and worker."""

    def __init__(self, directory: Path, socks: tuple[Path, Path], cert: tuple[Path, Path] | None):
        self.directory = directory
        self.socks = socks
        self.cert = cert
        self.port = self.tls_port = 0
        self.workers: list[int] = []
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: Lines | None = None

    def config(self) -> str:
        user = ""
        if os.geteuid() == 0:  # workers would otherwise switch to `nobody`
            name, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
            user = f"user {name} {group};"
        tls = ""
        if self.cert is not None:
            tls = (
                f"listen 127.0.0.1:{self.tls_port} ssl;\n"
                f"        ssl_certificate {self.cert[0]};\n"
                f"        ssl_certificate_key {self.cert[1]};"
            )
        return CONFIG.format(
            user=user,
            dir=self.directory,
            sock_a=self.socks[0],
            sock_b=self.socks[1],
            port=self.port,
            tls=tls,
            proxy=PROXY.strip(),
        )

    def start(self) -> None:
        """Start on free ports; a port taken meanwhile by someone else means another try."""
        assert NGINX is not None
        for attempt in range(3):
            self.port, self.tls_port = _free_port(), _free_port()
            path = self.directory / "nginx.conf"
            path.write_text(self.config())
            args = [NGINX, "-p", str(self.directory), "-e", "stderr", "-c", str(path)]
            self.proc = subprocess.Popen(
                [*args, "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert self.proc.stderr is not None
            self.stderr = Lines(self.proc.stderr)
            try:
                self.workers.append(int(self.stderr.wait_for(WORKER_STARTED).group(1)))
                return
            except AssertionError:
                in_use = "Address already in use" in self.stderr.text
                self.stop()
                if not in_use or attempt == 2:
                    raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def stop(self) -> None:
        """Fast shutdown (SIGTERM to the master); by force, master and workers, if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    for pid in [proc.pid, *self.workers]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    proc.wait(TIMEOUT)
            assert self.stderr is not None
            self.stderr.join()
        finally:
            assert proc.stderr is not None
            proc.stderr.close()


class Stack:
    """Two fulmen instances on Unix sockets behind one nginx."""

    def __init__(self, directory: Path) -> None:
        self.socks = (directory / "a.sock", directory / "b.sock")
        self.instances: list[Fulmen] = []
        self.nginx = Nginx(directory, self.socks, _certificate(directory))

    def start(self) -> None:
        for sock in self.socks:  # start both, then wait: they import in parallel
            self.instances.append(
                Fulmen(
                    "tests.apps_nginx:app",
                    "--uds",
                    str(sock),
                    "--forwarded-allow-ips",
                    "*",
                    "--no-access-log",
                    env=clean_env(),
                    wait_started=False,
                )
            )
        for instance in self.instances:
            instance.stderr.wait_for(STARTED)
        self.nginx.start()

    def stop(self) -> None:
        try:
            self.nginx.stop()
        finally:
            for instance in self.instances:
                instance.close()

    @property
    def pids(self) -> set[int]:
        return {instance.proc.pid for instance in self.instances}

    def tls_context(self) -> ssl.SSLContext:
        if self.nginx.cert is None:
            pytest.skip("openssl could not make a certificate for the HTTPS listener")
        return ssl.create_default_context(cafile=str(self.nginx.cert[0]))


@contextlib.contextmanager
def running_stack() -> Iterator[Stack]:
    # A short path: a Unix socket path is limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="fulmen-nginx-") as directory:
        stack = Stack(Path(directory))
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as running:
        yield running


def get(client: httpx.Client, path: str, **kwargs: Any) -> dict[str, Any]:
    response = client.get(path, **kwargs)
    assert response.status_code == 200, response.text
    seen: dict[str, Any] = response.json()
    return seen


def test_requests_reach_both_instances(stack: Stack) -> None:
    seen: set[int] = set()
    with httpx.Client(base_url=stack.nginx.url, timeout=TIMEOUT) as client:
        for _ in range(20):
            seen.add(get(client, "/")["pid"])
            if seen == stack.pids:
                break
    assert seen == stack.pids


def test_client_and_scheme_come_from_nginx(stack: Stack) -> None:
    with httpx.Client(base_url=stack.nginx.url, timeout=TIMEOUT) as client:
        # The client claims HTTPS; nginx overwrites X-Forwarded-Proto with its own $scheme.
        seen = get(client, "/", headers={"X-Forwarded-Proto": "https"})
    assert seen["x-forwarded-proto"] == "http"
    assert seen["scheme"] == "http"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["client"] == ["127.0.0.1", 0]  # from X-Forwarded-For: the Unix peer has none


def test_https_at_nginx_is_the_scheme(stack: Stack) -> None:
    context = stack.tls_context()
    with httpx.Client(base_url=stack.nginx.tls_url, verify=context, timeout=TIMEOUT) as client:
        seen = get(client, "/")
    assert seen["x-forwarded-proto"] == "https"
    assert seen["scheme"] == "https"  # fulmen itself serves plain HTTP on its Unix socket
    assert seen["client"] == ["127.0.0.1", 0]


def test_trusting_every_peer_trusts_the_whole_forwarded_chain(stack: Stack) -> None:
    """`--forwarded-allow-ips '*'` trusts every address in X-Forwarded-For, so the left-most
    one is the client: with `$proxy_add_x_forwarded_for` that is whatever the client sent.
    An edge nginx should send `$remote_addr` instead."""
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    with httpx.Client(base_url=stack.nginx.url, timeout=TIMEOUT) as client:
        appended = get(client, "/", headers=spoof)
        replaced = get(client, "/edge/", headers=spoof)
    assert appended["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert appended["client"] == ["203.0.113.9", 0]
    assert replaced["x-forwarded-for"] == "127.0.0.1"
    assert replaced["client"] == ["127.0.0.1", 0]


def _echo(url: str, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    with ws_connect(url, ssl=context, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        ws.send("héllo ✓")
        seen: dict[str, Any] = json.loads(ws.recv(timeout=TIMEOUT))
    return seen


def test_websocket_through_nginx(stack: Stack) -> None:
    seen = _echo(stack.nginx.url.replace("http", "ws", 1) + "/ws")
    assert seen["echo"] == "héllo ✓"
    assert seen["path"] == "/ws"
    assert seen["pid"] in stack.pids
    assert seen["x-forwarded-proto"] == "http"
    assert seen["scheme"] == "ws"
    assert seen["client"] == ["127.0.0.1", 0]


def test_secure_websocket_through_nginx(stack: Stack) -> None:
    context = stack.tls_context()
    seen = _echo(stack.nginx.tls_url.replace("https", "wss", 1) + "/ws", context)
    assert seen["echo"] == "héllo ✓"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["scheme"] == "wss"


class Load:
    """Threads sending GETs through nginx until stopped; every outcome is recorded."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ids = itertools.count()
        self.results: list[tuple[int, int | None, Any]] = []
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, path: str) -> None:
        thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _run(self, path: str) -> None:
        with httpx.Client(base_url=self.url, timeout=TIMEOUT) as client:
            while not self.stopping.is_set():
                request_id = next(self.ids)
                try:
                    response = client.get(path, headers={"x-request-id": str(request_id)})
                    ok = response.status_code == 200
                    outcome: tuple[int | None, Any] = (
                        response.status_code,
                        response.json() if ok else response.text,
                    )
                except Exception as exc:  # recorded and asserted on, not raised in a thread
                    outcome = (None, repr(exc))
                with self.cond:
                    self.results.append((request_id, *outcome))
                    self.cond.notify_all()

    def wait_until(self, predicate: Any, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.results), TIMEOUT):
                raise AssertionError(f"timed out waiting for {what}: {self.results[-5:]}")

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(TIMEOUT)


def test_sigterm_to_one_instance_loses_no_request() -> None:
    with running_stack() as stack:
        stopping, staying = stack.instances
        load = Load(stack.nginx.url)
        start = time.monotonic()
        load.start("/")
        load.start("/")
        try:
            load.wait_until(
                lambda results: {r[2]["pid"] for r in results if r[1] == 200} == stack.pids,
                "both instances to answer",
            )
            # A slow request in flight on the instance about to stop: the first one it starts.
            for _ in range(4):
                load.start("/slow")
            in_flight = int(stopping.stderr.wait_for(r"slow request started (\d+)").group(1))
            signalled = time.monotonic()
            stopping.signal(signal.SIGTERM)
            assert stopping.wait() == 0
            exited = next(load.ids)  # requests with a greater id were sent after the exit
            load.wait_until(
                lambda results: sum(r[0] > exited for r in results) >= 50, "requests after exit"
            )
        finally:
            load.stop()
        elapsed = time.monotonic() - start

    failures = [r for r in load.results if r[1] != 200]
    assert not failures, failures
    answers = {r[0]: r[2] for r in load.results}
    assert isinstance(answers[in_flight], dict)
    assert answers[in_flight]["pid"] == stopping.proc.pid
    assert answers[in_flight]["started"] < signalled < answers[in_flight]["finished"]
    after = [r[2] for r in load.results if r[0] > exited]
    assert {answer["pid"] for answer in after} == {staying.proc.pid}
    assert "Shutting down" in stopping.stderr.text
    assert stack.nginx.stderr is not None
    retried = stack.nginx.stderr.text.count("[error]")  # each one retried on the other instance
    print(f"{len(load.results)} requests in {elapsed:.2f} s, none lost; {retried} retried")
