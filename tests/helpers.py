"""Shared helpers for the CLI, lifespan, logging and server tests.

`Fulmen` runs `python -m fulmen ...` in a subprocess (cwd = the repository, so `tests.apps:NAME`
imports), collects its stderr and stdout lines in reader threads and waits for lines with a
deadline; `record_logs` captures the `fulmen` log records of a server started in this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from gunicorn.config import Config as GunicornConfig

from fulmen import server as server_module
from tests.conftest import TIMEOUT, RecordingHandler

ROOT = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"Fulmen running on (\S+)")


def ipv6_available() -> bool:
    """Whether this machine can bind the IPv6 loopback address."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without FULMEN_* settings, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FULMEN_") and key != "FORWARDED_ALLOW_IPS"
    }
    env.update(extra)
    return env


def run_fulmen(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run fulmen to completion (for commands that exit on their own), bounded by 20 s."""
    return subprocess.run(
        [sys.executable, "-m", "fulmen", *args],
        cwd=ROOT,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=20,
    )


class Lines:
    """Lines of one pipe, read by a thread; `wait_for` blocks until a line matches."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = TIMEOUT) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        checked = 0
        with self._cond:
            while True:
                for line in self.lines[checked:]:
                    match = regex.search(line)
                    if match:
                        return match
                checked = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    text = "\n".join(self.lines)
                    raise AssertionError(f"no line matching {regex.pattern!r} in:\n{text}")
                self._cond.wait(remaining)

    def join(self) -> None:
        self._thread.join(TIMEOUT)

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_count(self, pattern: str, count: int, timeout: float = TIMEOUT) -> list[str]:
        """The first `count` lines matching `pattern`, waiting for them up to `timeout`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                remaining = deadline - time.monotonic()
                if len(found) >= count:
                    return found[:count]
                if self.closed or remaining <= 0:
                    raise AssertionError(f"{count} x {pattern!r} not in:\n{self.text}")
                self._cond.wait(remaining)

    def count(self, pattern: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if re.search(pattern, line))


class Process:
    """A running command (cwd = the repository) whose output lines are collected; use as a
    context manager: it is always stopped, with `stop_signal` first, then by force."""

    stop_signal = signal.SIGTERM
    lines_class = Lines

    def __init__(
        self,
        command: list[str],
        env: dict[str, str] | None,
        pass_fds: tuple[int, ...] = (),
        new_session: bool = False,
    ) -> None:
        """`new_session`: in a process group of its own, as a terminal's foreground job, so
        that `ctrl_c` reaches it and its children, as a Ctrl+C does."""
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env or clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
            start_new_session=new_session,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stderr = self.lines_class(self.proc.stderr)
        self.stdout = self.lines_class(self.proc.stdout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def ctrl_c(self) -> None:
        """SIGINT to the whole process group (started with `new_session`), as a terminal
        sends it on Ctrl+C."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit code, once the process ended and its output was read."""
        code = self.proc.wait(timeout)
        self.stderr.join()
        self.stdout.join()
        return code

    def close(self) -> None:
        """Stop the process if it still runs (gracefully, then by force) and close the pipes."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(self.stop_signal)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.stderr.join()
            self.stdout.join()
        finally:
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()

    def __enter__(self):  # type: ignore[no-untyped-def]  # Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fulmen(Process):
    """A running `python -m fulmen` process, started once it logs its first address."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        wait_started: bool = True,
        new_session: bool = False,
    ) -> None:
        super().__init__([sys.executable, "-m", "fulmen", *args], env, pass_fds, new_session)
        self.address = ""
        if wait_started:
            try:
                self.address = self.stderr.wait_for(STARTED).group(1)
            except BaseException:
                self.close()
                raise

    @property
    def url(self) -> str:
        return self.address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


WORKER = "fulmen.workers.FulmenWorker"
H11_WORKER = "fulmen.workers.FulmenH11Worker"
BOOTING = re.compile(r"Booting worker with pid: (\d+)")
RUNNING = "Fulmen running on"
# Gunicorn 23+ opens a control socket at one fixed path: concurrent arbiters would share it.
NO_CONTROL = (
    ("--no-control-socket",) if "control_socket_disable" in GunicornConfig().settings else ()
)


class Gunicorn(Process):
    """A gunicorn arbiter serving `app` with a fulmen worker class; always stopped on exit."""

    stop_signal = signal.SIGQUIT

    def __init__(
        self,
        *args: str,
        app: str = "tests.apps_gunicorn:app",
        worker: str = WORKER,
        workers: int = 1,
        wait: bool = True,
        new_session: bool = False,
    ) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        fd = listener.fileno()
        command = [sys.executable, "-m", "gunicorn", "-k", worker, "--bind", f"fd://{fd}"]
        command += ["--workers", str(workers), *NO_CONTROL, *args, app]
        try:
            super().__init__(command, clean_env(), (fd,), new_session)
        finally:
            listener.close()
        if wait:
            try:
                self.stderr.wait_count(RUNNING, workers)
            except BaseException:
                self.close()
                raise

    def worker_pids(self) -> list[int]:
        return [int(m) for m in BOOTING.findall(self.stderr.text)]


@contextlib.contextmanager
def record_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingHandler]:
    """Record every `fulmen` log record of servers started meanwhile, from their first line.

    `Server.serve` reconfigures logging (replacing handlers), so the recording handler is added
    right after that configuration.
    """
    handler = RecordingHandler()
    names = ("fulmen", "fulmen.access")
    original = server_module.configure_with

    def configure(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        for name in names:
            logging.getLogger(name).addHandler(handler)

    monkeypatch.setattr(server_module, "configure_with", configure)
    try:
        yield handler
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)


def messages(handler: RecordingHandler, level: int = logging.DEBUG) -> list[str]:
    return [record.getMessage() for record in handler.records if record.levelno >= level]
