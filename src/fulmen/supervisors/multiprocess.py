"""`--workers N`: N server processes on listening sockets bound once, by this supervisor.

The supervisor binds the sockets, starts each worker with multiprocessing's "spawn" context
(a fresh interpreter that imports the application itself, so a restart loads new code) and
talks to it over one pipe:

- a worker reports READY once it is serving; it gets no health checks before that, so a slow
  import or lifespan startup is never mistaken for a hang;
- a ready worker is pinged and answers from its event loop: a loop blocked by the application
  cannot answer, and a worker silent for `--timeout-worker-healthcheck` seconds is killed and
  replaced;
- a worker leaving by itself (`--limit-max-requests`) reports EXITING first, so its
  replacement starts while it finishes its requests; the listening sockets stay open here, so
  connections waiting to be accepted are served by the other workers meanwhile;
- a worker that dies unasked is replaced; one that exits before it was ever ready failed to
  start (import error, lifespan startup failure): everything stops, instead of a crash loop.

Signals (gunicorn's arbiter has the same): SIGINT/SIGTERM stop every worker gracefully (a second
SIGINT is passed on, forcing them out). The workers leave SIGINT to the supervisor: a Ctrl+C
reaches the whole process group, and it would otherwise count twice in a worker (with the
supervisor's SIGTERM), forcing it out of its requests. SIGHUP restarts the workers one at a
time, each new one serving before its predecessor is asked to stop; SIGTTIN/SIGTTOU add/remove
a worker.

With `--metrics-bind`, the supervisor serves the endpoint (from a thread, `EndpointThread`):
each worker sends its counters with every PONG and once more as it exits, and every worker
replaced (died, hung, recycled, SIGHUP) counts in `fulmen_worker_restarts_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from fulmen.config import Config
from fulmen.importer import ImportFromStringError
from fulmen.logging import configure_from
from fulmen.metrics import EndpointThread, WorkerTotals
from fulmen.server import RESTART_SIGNALS, Server
from fulmen.sockets import describe, remove_socket_files
from fulmen.supervisors import listen_once

logger = logging.getLogger("fulmen.error")

READY, PING, PONG, EXITING, FORCE = "ready", "ping", "pong", "exiting", "force"
# With --metrics-bind, PONG is sent as (PONG, snapshot); a worker leaving sends (FINAL, snapshot).
FINAL = "final"
STARTUP_FAILURE = 3
# Beyond --timeout-graceful-shutdown, a stopping worker gets this long before it is killed:
# the server's own wait for the requests it cancels at the timeout (server.shutdown).
STOP_GRACE = 5.0
# The longest the supervisor sleeps without looking at its workers' clocks.
MAX_WAIT = 1.0
# Looked up by name so that the module imports where some do not exist (Windows).
HANDLED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGTTIN", "SIGTTOU")
    if hasattr(signal, name)
)
WORKER_IGNORED_SIGNALS = tuple(sig for sig in HANDLED_SIGNALS if sig != signal.SIGTERM)


class WorkerServer(Server):
    """The `Server` of one worker process: reports READY, answers pings from its loop."""

    announce = False  # the supervisor has logged the sockets once
    restart_signals = RESTART_SIGNALS
    exit_signals = (signal.SIGTERM,)  # a Ctrl+C is the supervisor's: it sends SIGTERM, FORCE

    def __init__(self, config: Config, conn: Connection) -> None:
        self._conn = conn
        self._started = False
        super().__init__(config)

    @property
    def started(self) -> bool:
        """True once serving; becoming True tells the supervisor this worker is ready."""
        return self._started

    @started.setter
    def started(self, value: bool) -> None:
        self._started = value
        if value:
            self._send(READY)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        fd = self._conn.fileno()
        # Answered by the event loop itself: a loop blocked by the application stays silent.
        loop.add_reader(fd, self._on_message)
        try:
            await super().serve(sockets)
        finally:
            loop.remove_reader(fd)

    def _on_message(self) -> None:
        try:
            while self._conn.poll():
                message = self._conn.recv()
                if message == PING:
                    self._conn.send(self._with_metrics(PONG))
                elif message == FORCE:  # a second Ctrl+C, as a second SIGINT to one server
                    self.handle_exit(signal.SIGINT)
        except (EOFError, OSError):  # the supervisor is gone: never outlive it
            assert self._loop is not None
            self._loop.remove_reader(self._conn.fileno())
            logger.error("The supervisor process is gone. Shutting down.")
            self.should_exit = True

    def _with_metrics(self, message: str) -> Any:
        if self.metrics is None or self.state is None:
            return message
        return (message, self.metrics.snapshot(len(self.state.connections)))

    async def _listen_metrics(self, address: str) -> None:
        pass  # the supervisor serves the sum over the workers

    def send_final_metrics(self) -> None:
        """As it exits: the counts since the last PONG are not lost."""
        if self.metrics is not None:
            self._send(self._with_metrics(FINAL))

    def _max_requests(self) -> None:
        super()._max_requests()
        self._send(EXITING)  # the supervisor starts a replacement now, not after the drain

    def _send(self, message: Any) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(message)


def worker_main(config: Config, sockets: list[socket.socket], conn: Connection) -> None:
    """The entry point of a worker process: serve `sockets` until told to stop."""
    # A Ctrl+C reaches the whole process group: leave it to the supervisor, which stops every
    # worker with SIGTERM (`WorkerServer.exit_signals`). The supervisor's commands, sent to the
    # group (a closed terminal sends SIGHUP), must neither kill nor suspend a worker.
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    server = WorkerServer(config, conn)
    try:
        server.run(sockets=sockets)
        server.send_final_metrics()
    except ImportFromStringError as exc:
        logger.error("Error loading ASGI app. %s", exc)
        sys.exit(1)
    finally:
        conn.close()
        for sock in sockets:
            sock.close()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class Worker:
    """The supervisor's view of one worker process."""

    __slots__ = (
        "conn",
        "generation",
        "kill_at",
        "killed",
        "next_ping",
        "pid",
        "ping_sent",
        "process",
        "ready",
        "replaces",
        "stopping",
    )

    def __init__(
        self, process: BaseProcess, conn: Connection, generation: int, replaces: Worker | None
    ) -> None:
        self.process = process
        assert process.pid is not None
        self.pid = process.pid
        self.conn: Connection | None = conn
        self.generation = generation  # SIGHUP starts a new generation and retires the older
        self.replaces = replaces  # the worker a rolling restart stops once this one is ready
        self.ready = False
        self.stopping = False  # asked to stop, or leaving by itself: no longer counted
        self.killed = False
        self.kill_at: float | None = None
        self.ping_sent: float | None = None
        self.next_ping = 0.0


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _signal(worker: Worker, sig: int) -> None:
    # `exitcode` polls: a worker reaped already (multiprocessing reaps finished children when
    # it starts another) is not signalled, since its pid may belong to another process now.
    if worker.process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)


class Multiprocess:
    """Run `config.workers` worker processes and keep that many serving until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.target = config.workers or 1
        self.workers: list[Worker] = []
        self.generation = 0
        self.stopping_all = False
        self.exit_code = 0
        self.sockets: list[socket.socket] = []
        self.ping_interval = min(1.0, config.timeout_worker_healthcheck / 2)
        self._signals: list[int] = []
        self._context = multiprocessing.get_context("spawn")
        self.totals: WorkerTotals | None = None  # --metrics-bind

    def run(self) -> int:
        """Supervise until stopped; the exit status (1: import error, 3: startup failure)."""
        config = self.config
        if not configure_from(config):
            return STARTUP_FAILURE
        if not isinstance(config.app, str):
            logger.error(
                "You must pass the application as an import string to use several workers."
            )
            return 1
        try:
            self.sockets, files = listen_once(config)
        except OSError as exc:
            logger.error("%s", exc)
            return STARTUP_FAILURE
        endpoint = None
        if config.metrics_bind:
            self.totals = totals = WorkerTotals()
            try:
                endpoint = EndpointThread(config.metrics_bind, totals.render, config.backlog)
            except OSError as exc:
                logger.error("%s", exc)
                for sock in self.sockets:
                    sock.close()
                remove_socket_files(files)
                return STARTUP_FAILURE
            endpoint.start()
            logger.info("Metrics on %s/metrics", describe(endpoint.socket, "http"))
        logger.info("Started parent process [%d]", os.getpid())
        wakeup_r, wakeup_w = socket.socketpair()
        previous = self._install_signal_handlers(wakeup_w)
        try:
            self._loop(wakeup_r)
        finally:
            if endpoint is not None:
                endpoint.stop()
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wakeup_r.close()
            wakeup_w.close()
            for sock in self.sockets:
                sock.close()
            remove_socket_files(files)
        logger.info("Finished parent process [%d]", os.getpid())
        return self.exit_code

    def _install_signal_handlers(self, wakeup: socket.socket) -> dict[int, Any]:
        wakeup.setblocking(False)
        previous: dict[int, Any] = {}
        for sig in HANDLED_SIGNALS:
            previous[sig] = signal.signal(sig, self._on_signal)
        # The handler only queues the signal; the wakeup byte ends the wait below at once.
        signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
        return previous

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)

    # The loop

    def _loop(self, wakeup: socket.socket) -> None:
        self._reconcile()
        while self.workers:
            waitables: list[Any] = [wakeup]
            for worker in self.workers:
                waitables.append(worker.process.sentinel)
                if worker.conn is not None:
                    waitables.append(worker.conn)
            ready = wait(waitables, self._timeout())
            if wakeup in ready:
                with contextlib.suppress(BlockingIOError):
                    wakeup.recv(4096)
            while self._signals:
                self._handle_signal(self._signals.pop(0))
            for worker in list(self.workers):
                if worker.conn is not None and worker.conn in ready:
                    self._read(worker)
                if worker.process.sentinel in ready:
                    self._reap(worker)
            self._check_clocks(time.monotonic())
            self._reconcile()

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + MAX_WAIT]
        for worker in self.workers:
            if worker.kill_at is not None:
                deadlines.append(worker.kill_at)
            if worker.ready and worker.conn is not None and not worker.killed:
                if worker.ping_sent is None:
                    deadlines.append(worker.next_ping)
                else:
                    deadlines.append(worker.ping_sent + self.config.timeout_worker_healthcheck)
        return max(0.0, min(deadlines) - now)

    def _read(self, worker: Worker) -> None:
        assert worker.conn is not None
        try:
            while worker.conn.poll():
                self._on_message(worker, worker.conn.recv())
        except (EOFError, OSError):  # the worker is exiting; its sentinel follows
            worker.conn.close()
            worker.conn = None

    def _on_message(self, worker: Worker, message: Any) -> None:
        now = time.monotonic()
        if isinstance(message, tuple):  # with --metrics-bind: (PONG or FINAL, snapshot)
            message, snapshot = message
            if self.totals is not None:
                self.totals.update(worker.pid, snapshot)
        if message == PONG:
            worker.ping_sent = None
            worker.next_ping = now + self.ping_interval
        elif message == READY:
            worker.ready = True
            worker.next_ping = now + self.ping_interval
            logger.info("Worker process [%d] is ready.", worker.pid)
            old = worker.replaces
            worker.replaces = None
            if old is not None and old in self.workers and not old.stopping:
                self._restarted()
                self._stop(old, f"replaced by [{worker.pid}]")
        elif message == EXITING and not worker.stopping:
            logger.info(
                "Worker process [%d] reached its request limit; starting a replacement.",
                worker.pid,
            )
            self._restarted()
            self._mark_stopping(worker)

    def _reap(self, worker: Worker) -> None:
        worker.process.join()
        self.workers.remove(worker)
        if worker.conn is not None:
            self._read(worker)  # its last messages (final metrics), if not read yet
        if worker.conn is not None:
            worker.conn.close()
        if self.totals is not None:
            self.totals.retire(worker.pid)
        code = worker.process.exitcode
        worker.process.close()
        if self.stopping_all or worker.stopping:
            logger.info("Worker process [%d] stopped (%s).", worker.pid, _exit_reason(code))
        elif not worker.ready:
            self._startup_failed(worker, code)
        else:
            logger.warning(
                "Worker process [%d] died (%s); starting a replacement.",
                worker.pid,
                _exit_reason(code),
            )
            self._restarted()

    def _startup_failed(self, worker: Worker, code: int | None) -> None:
        if worker.replaces is not None:
            # A rolling restart onto code that does not start: keep the running workers.
            logger.error(
                "New worker process [%d] failed to start (%s). Restart aborted; the running "
                "workers keep serving.",
                worker.pid,
                _exit_reason(code),
            )
            for other in self.workers:
                other.generation = self.generation
            return
        logger.error(
            "Worker process [%d] failed to start (%s). Stopping all workers.",
            worker.pid,
            _exit_reason(code),
        )
        self.exit_code = code if code is not None and code > 0 else STARTUP_FAILURE
        self._stop_all()

    def _check_clocks(self, now: float) -> None:
        timeout = self.config.timeout_worker_healthcheck
        for worker in self.workers:
            if worker.killed:
                continue
            if worker.kill_at is not None and now >= worker.kill_at:
                logger.warning("Worker process [%d] did not stop in time; killing it.", worker.pid)
                self._kill(worker)
            elif not worker.ready or worker.conn is None:
                continue
            elif worker.ping_sent is not None and now - worker.ping_sent >= timeout:
                logger.error(
                    "Worker process [%d] did not answer the health check within %s s "
                    "(its event loop is blocked); killing it.",
                    worker.pid,
                    timeout,
                )
                self._restarted()
                self._kill(worker)
            elif worker.ping_sent is None and now >= worker.next_ping:
                try:
                    worker.conn.send(PING)
                except OSError:  # exiting; its sentinel follows
                    continue
                worker.ping_sent = now

    # Starting and stopping workers

    def _reconcile(self) -> None:
        """Start or stop workers until `target` are serving; advance a rolling restart."""
        if self.stopping_all:
            return
        active = [w for w in self.workers if not w.stopping]
        # A rolling restart's new worker counts once ready (its predecessor counts until then).
        counted = [w for w in active if w.ready or w.replaces is None]
        for _ in range(self.target - len(counted)):
            self._spawn(None)
        surplus = len(counted) - self.target
        if surplus > 0:
            # Older generations first, then the most recently started.
            order = sorted(counted, key=lambda w: (w.generation, -self.workers.index(w)))
            for worker in order[:surplus]:
                self._stop(worker, "fewer workers wanted")
        active = [w for w in self.workers if not w.stopping]
        if any(not w.ready for w in active):
            return  # one at a time: wait until every worker started is serving
        old = [w for w in active if w.generation < self.generation]
        if old:
            self._spawn(old[0])

    def _spawn(self, replaces: Worker | None) -> None:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=worker_main,
            args=(self.config, self.sockets, child_conn),
            name="fulmen-worker",
        )
        process.start()
        child_conn.close()
        self.workers.append(Worker(process, parent_conn, self.generation, replaces))

    def _restarted(self) -> None:
        """A worker is being replaced: counted for `fulmen_worker_restarts_total`."""
        if self.totals is not None:
            self.totals.restarted()

    def _mark_stopping(self, worker: Worker) -> None:
        worker.stopping = True
        graceful = self.config.timeout_graceful_shutdown
        if graceful is not None and worker.kill_at is None:
            worker.kill_at = time.monotonic() + graceful + STOP_GRACE

    def _stop(self, worker: Worker, reason: str) -> None:
        """Stop one worker while the others serve on: a restart (its WebSockets close with
        1012, service restart, so their clients reconnect to the others)."""
        logger.info("Stopping worker process [%d] (%s).", worker.pid, reason)
        self._mark_stopping(worker)
        _signal(worker, RESTART_SIGNALS[0] if RESTART_SIGNALS else signal.SIGTERM)

    def _kill(self, worker: Worker) -> None:
        worker.killed = True
        worker.stopping = True
        worker.kill_at = None
        _signal(worker, signal.SIGKILL)

    def _stop_all(self) -> None:
        if not self.stopping_all:
            self.stopping_all = True
            logger.info("Stopping parent process [%d]", os.getpid())
        for worker in self.workers:
            if not worker.killed:
                self._mark_stopping(worker)
                _signal(worker, signal.SIGTERM)

    # Signals

    def _handle_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if sig in (signal.SIGINT, signal.SIGTERM):
            if not self.stopping_all:
                logger.info("Received %s, stopping all workers.", name)
                self._stop_all()
            elif sig == signal.SIGINT:  # a second Ctrl+C: the workers stop waiting at once
                logger.warning("Forced exit.")
                for worker in self.workers:
                    if worker.conn is not None:
                        with contextlib.suppress(OSError):
                            worker.conn.send(FORCE)
        elif self.stopping_all:
            return
        elif sig == signal.SIGHUP:
            logger.info("Received SIGHUP, restarting the workers one at a time.")
            self.generation += 1
        elif sig == signal.SIGTTIN:
            self.target += 1
            logger.info("Received SIGTTIN, increasing the number of workers to %d.", self.target)
        elif self.target == 1:  # SIGTTOU
            logger.info("Received SIGTTOU, but one worker is the minimum.")
        else:
            self.target -= 1
            logger.info("Received SIGTTOU, decreasing the number of workers to %d.", self.target)
