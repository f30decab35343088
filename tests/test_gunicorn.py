"""The gunicorn worker classes, under a real gunicorn arbiter (`python -m gunicorn -k ...`).

Each test hands gunicorn a listening socket it bound itself (`--bind fd://N`), so the port is
known without a race. Markers printed by `tests.apps_gunicorn` carry the worker's pid.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from gunicorn.config import Config as GunicornConfig

from fulmen.config import Config
from fulmen.workers import FulmenH11Worker, FulmenWorker, graceful_timeout
from tests.conftest import TIMEOUT
from tests.helpers import BOOTING, H11_WORKER, RUNNING, Gunicorn


def get(url: str, timeout: float = TIMEOUT) -> httpx.Response:
    """One request on its own connection (a pooled idle connection may be closed by a worker
    that is shutting down: that race belongs to keep-alive, not to the worker)."""
    with httpx.Client(timeout=timeout) as client:
        return client.get(url)


def info(url: str) -> dict[str, Any]:
    response = get(url)
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def gone(pid: int) -> bool:
    """Whether process `pid` ended (and was reaped) within TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


# -- configuration from gunicorn's settings (in this process, no fork) --------------------------


def make_worker(
    settings: dict[str, Any], worker_class: type[FulmenWorker] = FulmenWorker
) -> FulmenWorker:
    cfg = GunicornConfig()
    for name, value in settings.items():
        cfg.set(name, value)
    worker = worker_class(1, os.getpid(), [], None, cfg.timeout / 2.0, cfg, None)
    worker.tmp.close()  # the heartbeat file gunicorn opens for each worker
    return worker


def test_config_from_gunicorn_defaults() -> None:
    config = make_worker({}).config
    assert config.loop == "auto" and config.http == "auto"
    assert config.timeout_keep_alive == 2  # gunicorn's --keep-alive default
    assert config.timeout_graceful_shutdown == 29.0  # 30 s minus the last second
    assert config.limit_max_requests is None
    assert config.backlog == 2048
    assert config.limit_request_line == 4094
    assert config.forwarded_allow_ips == "127.0.0.1,::1"
    assert config.access_log is False  # gunicorn logs no access lines without --access-logfile
    assert config.ssl_certfile is None


def test_config_from_gunicorn_settings() -> None:
    worker = make_worker(
        {
            "keepalive": 7,
            "graceful_timeout": 5,
            "max_requests": 100,
            "max_requests_jitter": 50,
            "backlog": 64,
            "forwarded_allow_ips": "10.0.0.1, 10.0.1.0/24",
            "root_path": "/api",
            "asgi_lifespan": "off",
            "loglevel": "WARNING",
            "accesslog": "-",
            "limit_request_line": 0,
        }
    )
    config = worker.config
    assert config.timeout_keep_alive == 7
    assert config.timeout_graceful_shutdown == 4.5
    assert 100 <= config.limit_max_requests <= 150  # type: ignore[operator]
    assert config.limit_max_requests == worker.max_requests  # gunicorn's jitter, drawn once
    assert config.backlog == 64
    assert config.trusted_hosts == ["10.0.0.1", "10.0.1.0/24"]
    assert config.root_path == "/api"
    assert config.lifespan == "off"
    assert config.log_level == "warning"
    assert config.access_log is True
    assert config.limit_request_line == Config.h11_max_incomplete_event_size  # 0: unlimited


def test_config_tls_from_gunicorn_settings(tmp_path: Path) -> None:
    ca, key = tmp_path / "ca.pem", tmp_path / "key.pem"
    settings = {"certfile": "cert.pem", "keyfile": str(key), "ca_certs": str(ca)}
    settings.update(cert_reqs=int(ssl.CERT_REQUIRED), ciphers="ECDHE+AESGCM")
    config = make_worker(settings).config
    assert (config.ssl_certfile, config.ssl_keyfile) == ("cert.pem", str(key))
    assert config.ssl_ca_certs == str(ca)
    assert config.ssl_cert_reqs == ssl.CERT_REQUIRED
    assert config.ssl_ciphers == "ECDHE+AESGCM"
    assert config.ssl_version == int(ssl.PROTOCOL_TLS)


def test_h11_worker_and_subclass_options() -> None:
    config = make_worker({}, FulmenH11Worker).config
    assert (config.http, config.loop) == ("h11", "asyncio")

    class Custom(FulmenWorker):
        CONFIG_KWARGS = {**FulmenWorker.CONFIG_KWARGS, "limit_concurrency": 50, "keepalive": 1}

    with pytest.raises(TypeError, match="unknown fulmen option 'keepalive'"):
        make_worker({}, Custom)
    Custom.CONFIG_KWARGS = {**FulmenWorker.CONFIG_KWARGS, "limit_concurrency": 50}
    assert make_worker({}, Custom).config.limit_concurrency == 50


def test_graceful_timeout_keeps_a_margin_for_the_cleanup() -> None:
    assert graceful_timeout(30) == 29.0
    assert graceful_timeout(5) == 4.5
    assert graceful_timeout(1) == 0.9
    assert graceful_timeout(0) == 0.0


# -- under a real arbiter -----------------------------------------------------------------------


def test_serves_and_logs_through_gunicorn() -> None:
    with Gunicorn("--access-logfile", "-") as server:
        body = info(server.url + "/path")
        assert body["pid"] in server.worker_pids() and body["pid"] != server.proc.pid
        assert body["started_by"] == body["pid"]  # lifespan state of this very worker
        assert body["loop"] == ("uvloop" if _has("uvloop") else "asyncio")
        # fulmen's records use gunicorn's error log format and its access log destination
        server.stderr.wait_for(r"^\[.+\] \[\d+\] \[INFO\] Fulmen running on http://\S+$")
        server.stdout.wait_for(r'^127\.0\.0\.1:\d+ - "GET /path HTTP/1\.1" 200 OK$')
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert "Press CTRL+C" not in server.stderr.text  # the arbiter takes the Ctrl+C


def test_h11_worker_serves_on_asyncio() -> None:
    with Gunicorn(worker=H11_WORKER) as server:
        assert info(server.url)["loop"] == "asyncio"


def test_no_access_log_without_access_logfile() -> None:
    with Gunicorn() as server:
        info(server.url)
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert server.stdout.lines == []
        assert "GET /" not in server.stderr.text


def test_lifespan_runs_in_each_worker() -> None:
    with Gunicorn(workers=2) as server:
        started = server.stderr.wait_count(r"^lifespan startup \d+$", 2)
        pids = {int(line.split()[-1]) for line in started}
        assert pids == set(server.worker_pids())
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        stopped = server.stderr.wait_count(r"^lifespan shutdown \d+$", 2, timeout=0)
        assert {int(line.split()[-1]) for line in stopped} == pids


def test_websocket_through_the_worker() -> None:
    websockets_client = pytest.importorskip("websockets.sync.client")
    with Gunicorn() as server:
        uri = f"ws://127.0.0.1:{server.port}/ws"
        with websockets_client.connect(uri, open_timeout=TIMEOUT) as ws:
            ws.send("hello")
            assert ws.recv(timeout=TIMEOUT) == f"{server.worker_pids()[0]} hello"


class Traffic:
    """Requests in a loop from a thread, each on a new connection, recording pids and errors."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pids: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = get(self.url)
                if response.status_code == 200:
                    self.pids.append(response.json()["pid"])
                else:
                    self.errors.append(f"status {response.status_code}")
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


def test_hup_replaces_workers_without_failing_requests() -> None:
    with Gunicorn(workers=2) as server:
        old = set(server.worker_pids())
        traffic = Traffic(server.url)
        try:
            server.signal(signal.SIGHUP)
            server.stderr.wait_count(BOOTING.pattern, 4)
            server.stderr.wait_count(r"^lifespan shutdown \d+$", 2)
            new = set(server.worker_pids()) - old
            deadline = time.monotonic() + TIMEOUT
            while not new & set(traffic.pids[-5:]) and time.monotonic() < deadline:
                time.sleep(0.05)  # until the new workers answer
        finally:
            traffic.stop()
        assert traffic.errors == []
        assert new & set(traffic.pids), "no request answered by a new worker"
        for pid in old:
            assert gone(pid)


def test_max_requests_recycles_the_worker_without_failing_requests() -> None:
    with Gunicorn("--max-requests", "3") as server:
        pids = [info(server.url)["pid"] for _ in range(8)]
        assert pids[:3] == [pids[0]] * 3
        assert pids[3] != pids[0]
        assert len(set(pids)) == 3  # 3 + 3 + 2 requests
        server.stderr.wait_for("Maximum request limit of 3 exceeded")


def _slow(url: str, seconds: float) -> concurrent.futures.Future[httpx.Response]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(get, f"{url}/slow?{seconds}", 30)
    pool.shutdown(wait=False)
    return future


def test_sigterm_lets_an_in_flight_request_finish() -> None:
    with Gunicorn() as server:
        future = _slow(server.url, 1.0)
        server.stderr.wait_for("slow request started")
        server.signal(signal.SIGTERM)
        assert future.result(TIMEOUT).status_code == 200
        assert server.wait() == 0
        server.stderr.wait_for(r"^lifespan shutdown \d+$", timeout=0)


def test_graceful_timeout_cuts_a_longer_request() -> None:
    with Gunicorn("--graceful-timeout", "2") as server:
        future = _slow(server.url, 60)
        server.stderr.wait_for("slow request started")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):
            future.result(TIMEOUT)
        assert server.wait() == 0
        assert time.monotonic() - started < 8


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_quick_shutdown_does_not_wait_for_requests(sig: int, tmp_path: Path) -> None:
    hook = "import os, sys\ndef worker_int(worker):\n"
    hook += "    print('worker_int', os.getpid(), file=sys.stderr)\n"
    with Gunicorn("-c", _config_file(tmp_path, hook)) as server:  # graceful timeout: 30 s
        future = _slow(server.url, 60)
        server.stderr.wait_for("slow request started")
        started = time.monotonic()
        server.signal(sig)
        with pytest.raises(httpx.HTTPError):
            future.result(TIMEOUT)
        server.wait()
        assert time.monotonic() - started < 8
        pid = server.worker_pids()[0]
        assert server.stderr.count(f"^worker_int {pid}$") == 1
        assert server.stderr.count(f"^lifespan shutdown {pid}$") == 1  # quick, yet cleaned up
        assert "Traceback" not in server.stderr.text


@pytest.mark.parametrize("stop", ["SIGINT", "SIGQUIT", "SIGTERM", "ctrl-c"])
def test_every_stop_runs_the_lifespan_shutdown(stop: str, tmp_path: Path) -> None:
    """A FastAPI app's shutdown hook runs in every worker, whichever signal stops gunicorn
    (Ctrl+C: SIGINT to the arbiter and its workers alike), and nothing is logged as an
    error."""
    app = "tests.apps_gunicorn:fastapi_app"
    args = ("-e", f"TEST_MARKER_DIR={tmp_path}")
    with Gunicorn(*args, app=app, workers=2, new_session=True) as server:
        pids = server.worker_pids()
        assert get(server.url).json()["pid"] in pids
        if stop == "ctrl-c":
            server.ctrl_c()
        else:
            server.signal(getattr(signal, stop))
        assert server.wait() == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        f"shutdown-{pid}" for pid in pids
    )
    assert server.stderr.count(r"^fastapi shutdown \d+$") == 2
    for text in ("Traceback", "[ERROR]", "CancelledError", "Press CTRL+C"):
        assert text not in server.stderr.text, server.stderr.text


def test_worker_sigterm_alone_is_replaced() -> None:
    with Gunicorn() as server:
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGTERM)
        server.stderr.wait_count(BOOTING.pattern, 2)
        server.stderr.wait_count(RUNNING, 2)
        assert info(server.url)["pid"] != pid


@pytest.mark.parametrize(
    ("app", "code", "reason"),
    [
        ("tests.apps_gunicorn:failing_startup", 3, "Worker failed to boot"),
        ("tests.apps_gunicorn:missing", 4, "App failed to load"),  # gunicorn's own check
    ],
)
def test_app_that_cannot_start_stops_the_arbiter(app: str, code: int, reason: str) -> None:
    with Gunicorn(app=app, wait=False) as server:
        assert server.wait() == code
        assert reason in server.stderr.text
        assert len(server.worker_pids()) == 1  # no crash loop


def test_startup_failure_with_several_workers_stops_the_arbiter() -> None:
    # With several workers gunicorn may exit with 1 (its HaltServer escapes while halting).
    with Gunicorn(app="tests.apps_gunicorn:failing_startup", workers=3, wait=False) as server:
        assert server.wait() != 0
        assert "Worker failed to boot" in server.stderr.text
        assert len(server.worker_pids()) <= 3
        assert "Application startup failed" in server.stderr.text


def test_arbiter_death_stops_the_worker() -> None:
    with Gunicorn() as server:
        (pid,) = server.worker_pids()
        server.proc.kill()
        server.proc.wait(TIMEOUT)
        server.stderr.wait_for("Parent changed, shutting down")
        assert gone(pid)


def test_heartbeat_keeps_a_busy_worker_alive() -> None:
    # The arbiter kills a worker silent for `--timeout` seconds; an awaiting request is no
    # reason to be silent.
    with Gunicorn("--timeout", "1") as server:
        (pid,) = server.worker_pids()
        response = get(server.url + "/slow?3")
        assert response.status_code == 200 and response.json()["pid"] == pid
        assert "WORKER TIMEOUT" not in server.stderr.text


def test_blocked_loop_is_aborted_and_replaced() -> None:
    with Gunicorn("--timeout", "1") as server:
        (pid,) = server.worker_pids()
        # The arbiter's ABRT interrupts the blocking call: the request is answered 500.
        assert get(server.url + "/block?30").status_code == 500
        server.stderr.wait_for(f"WORKER TIMEOUT \\(pid:{pid}\\)")
        server.stderr.wait_for(f"Worker \\(pid:{pid}\\) exited with code 1")
        server.stderr.wait_count(RUNNING, 2)
        assert info(server.url)["pid"] != pid
        assert f"lifespan shutdown {pid}" not in server.stderr.text  # aborted, not graceful


def test_usr1_reopens_the_log_files(tmp_path: Path) -> None:
    access, error = tmp_path / "access.log", tmp_path / "error.log"
    args = ("--access-logfile", str(access), "--error-logfile", str(error))
    with Gunicorn(*args, wait=False) as server:
        _wait_file(error, RUNNING)
        info(server.url + "/before")
        _wait_file(access, "GET /before")
        access.rename(tmp_path / "access.log.1")
        error.rename(tmp_path / "error.log.1")
        server.signal(signal.SIGUSR1)
        deadline = time.monotonic() + TIMEOUT
        while not access.exists() or "GET /after" not in access.read_text():
            assert time.monotonic() < deadline, "access log not reopened"
            info(server.url + "/after")
            time.sleep(0.05)
        assert "GET /before" not in access.read_text()
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert "Shutting down" in error.read_text()


def test_reload_restarts_the_worker(tmp_path: Path) -> None:
    watched = tmp_path / "settings.txt"
    watched.write_text("one")
    args = ("--reload", "--reload-engine", "poll", "--reload-extra-file", str(watched))
    with Gunicorn(*args) as server:
        (pid,) = server.worker_pids()
        # The poll reloader compares modification times once a second, from its first scan
        # (which may come after our first change): keep moving the time forward until it
        # notices, each time later than the last.
        deadline = time.monotonic() + TIMEOUT
        later = time.time()
        while "Worker reloading" not in server.stderr.text:
            assert time.monotonic() < deadline, "the reloader never noticed"
            later += 10
            os.utime(watched, (later, later))
            with contextlib.suppress(AssertionError):
                server.stderr.wait_for("Worker reloading", timeout=0.5)
        server.stderr.wait_count(RUNNING, 2)
        assert info(server.url)["pid"] != pid


def _wait_file(path: Path, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists() or text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in {path}"
        time.sleep(0.05)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_stop_signal_while_loading_the_app_is_not_a_boot_error() -> None:
    with Gunicorn(app="tests.apps_gunicorn:slow_factory()", wait=False) as server:
        pid = int(server.stderr.wait_for(r"^factory called (\d+)$").group(1))
        os.kill(pid, signal.SIGTERM)  # before the worker's event loop runs
        server.stderr.wait_for(f"Worker exiting \\(pid: {pid}\\)")
        assert server.stderr.wait_count(BOOTING.pattern, 2)  # replaced: the arbiter goes on
        assert "exited with code" not in server.stderr.text
        assert server.proc.poll() is None


def _config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gunicorn_conf.py"
    path.write_text(text)
    return str(path)


def test_hooks_can_adjust_the_worker_config(tmp_path: Path) -> None:
    hook = "def post_fork(server, worker):\n    worker.config.root_path = '/hooked'\n"
    with Gunicorn("-c", _config_file(tmp_path, hook)) as server:
        assert info(server.url)["root_path"] == "/hooked"


def test_exception_while_starting_is_a_boot_error(tmp_path: Path) -> None:
    hook = "def post_fork(server, worker):\n    worker.config.headers = ['no colon']\n"
    with Gunicorn("-c", _config_file(tmp_path, hook), wait=False) as server:
        assert server.wait() == 3
        assert "Exception while starting the application" in server.stderr.text
        assert "--header must be 'Name: value'" in server.stderr.text


def test_gunicorn_log_config_owns_the_fulmen_loggers(tmp_path: Path) -> None:
    config = """logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"custom": {"format": "CUSTOM %(name)s %(message)s"}},
    "handlers": {
        "out": {"class": "logging.StreamHandler", "formatter": "custom", "stream": "ext://sys.stdout"}
    },
    "root": {"level": "INFO", "handlers": ["out"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["out"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["out"], "propagate": False},
    },
}
"""
    with Gunicorn("-c", _config_file(tmp_path, config), wait=False) as server:
        server.stdout.wait_for(r"^CUSTOM fulmen\.error Fulmen running on")
        info(server.url + "/logged")
        server.stdout.wait_for(r'^CUSTOM fulmen\.access 127\.0\.0\.1:\d+ - "GET /logged HTTP/1\.1"')


def test_tls_from_gunicorn_settings(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with Gunicorn("--certfile", str(certfile), "--keyfile", str(keyfile)) as server:
        server.stderr.wait_for(f"Fulmen running on https://127.0.0.1:{server.port}")
        url = f"https://127.0.0.1:{server.port}/"
        with httpx.Client(verify=client_context, timeout=TIMEOUT) as client:
            response = client.get(url)
        assert response.status_code == 200 and response.json()["scheme"] == "https"


def test_unusable_certificate_is_a_boot_error(tmp_path: Path) -> None:
    certfile = tmp_path / "cert.pem"
    certfile.write_text("not a certificate")
    with Gunicorn("--certfile", str(certfile), wait=False) as server:
        assert server.wait() == 3
        assert "no PEM certificate" in server.stderr.text
