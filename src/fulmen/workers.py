"""Gunicorn worker classes: `gunicorn -k fulmen.workers.FulmenWorker myapp:app`.

Gunicorn's arbiter binds the listening sockets, forks the workers and replaces them (on `HUP`,
after `--max-requests`, when one dies or stops sending its heartbeat). Each worker runs one fulmen
`Server` on the sockets it inherited, with a `Config` built from gunicorn's settings (see
`FulmenWorker.config_kwargs`). The worker keeps gunicorn's contracts:

- a heartbeat (`notify()`) from the event loop every second at most, so a worker whose loop is
  blocked for longer than `--timeout` is killed and replaced, while a busy one is not;
- signals: `TERM` graceful shutdown, `INT`/`QUIT` quick shutdown, `USR1` reopen the log files,
  `ABRT` (sent by the arbiter on a timeout) runs the `worker_abort` hook and exits;
- open WebSockets close with 1012 (service restart) when the worker leaves by itself
  (`--max-requests`, gunicorn's `--reload`), and with 1001 (going away) on `TERM`, which the
  arbiter sends both to stop and to replace workers (`HUP`): the worker cannot tell which;
- exit status 3 (`WORKER_BOOT_ERROR`) when the application fails to start, so the arbiter stops
  instead of starting failing workers forever;
- exit when the arbiter is gone (the parent pid changed), as gunicorn's own workers do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any, ClassVar

from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker

from fulmen.config import LOG_LEVEL_CHOICES, Config
from fulmen.loops import loop_factory
from fulmen.loops import run as run_loop
from fulmen.server import Server

__all__ = ["FulmenH11Worker", "FulmenWorker"]

HEARTBEAT_SECONDS = 1.0
# Gunicorn's quick shutdown: the arbiter sends QUIT on its own INT/QUIT (Ctrl+C); its workers
# treat INT the same way.
QUICK_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT})
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def graceful_timeout(seconds: float) -> float:
    """How long in-flight requests may run after `TERM`, out of gunicorn's `graceful_timeout`.

    The arbiter kills a worker still alive `graceful_timeout` seconds after it asked it to stop.
    The last tenth of that (at most one second) is kept for cancelling the requests that did not
    finish and for the lifespan shutdown, so they run before the `SIGKILL` rather than never.
    """
    return max(0.0, seconds - min(1.0, seconds / 10))


def access_log_enabled(cfg: Any) -> bool:
    """Whether gunicorn's settings send access lines anywhere (gunicorn's own rule)."""
    return bool(
        cfg.accesslog
        or cfg.logconfig
        or cfg.logconfig_dict
        or getattr(cfg, "logconfig_json", None)
        or (cfg.syslog and not cfg.disable_redirect_access_to_syslog)
    )


def _setting(cfg: Any, name: str, default: Any) -> Any:
    """A setting newer gunicorn versions have, or `default` on older ones."""
    setting = cfg.settings.get(name)
    return default if setting is None else setting.get()


class FulmenWorker(Worker):  # type: ignore[misc]  # gunicorn has no type information
    """Serve the ASGI application gunicorn loaded, with uvloop and httptools when installed.

    `config` (a `fulmen.Config`) exists from construction, before the fork, so gunicorn's
    `pre_fork`/`post_fork` hooks can adjust it; a subclass can set options gunicorn has no
    setting for in `CONFIG_KWARGS` (they are applied last).
    """

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", "http": "auto"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            # The application is set once the worker process has loaded it (`load_wsgi`).
            self.config = Config("", **self.config_kwargs())
        except BaseException:
            self.tmp.close()  # the heartbeat file the base class opened
            raise
        self.server = _WorkerServer(self.config, self)

    def config_kwargs(self) -> dict[str, Any]:
        """Fulmen options from gunicorn's settings."""
        cfg = self.cfg
        level = cfg.loglevel.lower()
        options: dict[str, Any] = {
            "timeout_keep_alive": cfg.keepalive,
            "timeout_graceful_shutdown": graceful_timeout(cfg.graceful_timeout),
            # `max_requests` already includes this worker's random `max_requests_jitter`.
            "limit_max_requests": self.max_requests if cfg.max_requests > 0 else None,
            "backlog": cfg.backlog,
            "forwarded_allow_ips": ",".join(cfg.forwarded_allow_ips),  # a list in gunicorn
            "root_path": _setting(cfg, "root_path", ""),
            "lifespan": _setting(cfg, "asgi_lifespan", "auto"),
            "log_level": level if level in LOG_LEVEL_CHOICES else "info",
            "access_log": access_log_enabled(cfg),
        }
        if cfg.is_ssl:
            # Gunicorn has no key password setting; its `ssl_context` hook is not called.
            options.update(
                ssl_certfile=cfg.certfile,
                ssl_keyfile=cfg.keyfile,
                ssl_version=int(cfg.ssl_version),
                ssl_cert_reqs=int(cfg.cert_reqs),
                ssl_ca_certs=cfg.ca_certs,
                ssl_ciphers=cfg.ciphers,
            )
        if cfg.limit_request_line > 0:  # 0 is gunicorn's "unlimited": fulmen's head limit holds
            options["limit_request_line"] = cfg.limit_request_line
        else:
            options["limit_request_line"] = Config.h11_max_incomplete_event_size
        options.update(self.CONFIG_KWARGS)
        return options

    def init_signals(self) -> None:
        """Gunicorn's worker signals, before and after the event loop runs.

        The loop's own handlers (the server's `TERM`/`INT`, `QUIT` added in `_serve`) replace
        the `TERM`/`INT`/`QUIT` ones while it runs; `ABRT` stays a plain handler because the
        arbiter sends it when the loop is blocked.
        """
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for sig in EXIT_SIGNALS:
            signal.signal(sig, self._on_exit_signal)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        signal.signal(signal.SIGWINCH, self.handle_winch)
        signal.signal(signal.SIGABRT, self.handle_abort)
        # Let running system calls finish rather than fail with EINTR (as gunicorn's workers).
        signal.siginterrupt(signal.SIGTERM, False)
        signal.siginterrupt(signal.SIGUSR1, False)

    def _on_exit_signal(self, sig: int, frame: FrameType | None) -> None:
        self.server.handle_exit(sig)

    def handle_abort(self, sig: int, frame: FrameType | None) -> None:
        """`ABRT`: the arbiter found the loop blocked for longer than `--timeout`.

        As gunicorn's workers: run the `worker_abort` hook and raise `SystemExit` where the
        loop is blocked (a request blocking it is answered 500), then leave at once (quick
        shutdown) with status 1.
        """
        self.aborted = True
        self.server.abort = self.server.force_exit = True
        self.server.should_exit = True
        self.alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)

    def run(self) -> None:
        """Serve until told to stop; exit with `WORKER_BOOT_ERROR` if the app did not start."""
        self.config.app = self.wsgi
        server = self.server
        factory = loop_factory(self.config.loop)
        server.owns_process = True
        try:
            run_loop(self._serve(server), factory)
        except Exception:
            if server.started:
                raise
            self.log.exception("Exception while starting the application")
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        if self.aborted:
            sys.exit(1)
        # A worker told to stop before it finished starting did not fail to boot.
        if not server.started and self.alive:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    async def _serve(self, server: Server) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, server.handle_exit, signal.SIGQUIT)
        heartbeat = loop.create_task(self._heartbeat(server))
        try:
            await server.serve(sockets=[listener.sock for listener in self.sockets])
        finally:
            heartbeat.cancel()
            loop.remove_signal_handler(signal.SIGQUIT)
            signal.signal(signal.SIGQUIT, self._on_exit_signal)

    async def _heartbeat(self, server: Server) -> None:
        """Tell the arbiter this loop is alive; stop when the arbiter is gone or asked us to.

        The arbiter's `timeout` reaches the worker halved (`self.timeout`); notifying every
        second at most keeps well within it. `alive` turns false when gunicorn's `--reload`
        reloader sees a changed file.
        """
        interval = min(self.timeout, HEARTBEAT_SECONDS) if self.timeout > 0 else HEARTBEAT_SECONDS
        while True:
            self.notify()
            if not server.should_exit:
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    server.should_exit = True
                elif not self.alive:  # gunicorn's reloader: a restart
                    server.restart()
            await asyncio.sleep(interval)

    def route_logging(self) -> None:
        """Send fulmen's log records through gunicorn's handlers (`--error-logfile`,
        `--access-logfile`, syslog, `--log-level`), so `USR1` reopens them too.

        With a gunicorn logging configuration (`--log-config`, `--log-config-dict`, ...) the
        `fulmen` loggers are left to it: they propagate to the root logger unless it names them.
        """
        cfg = self.cfg
        if cfg.logconfig or cfg.logconfig_dict or getattr(cfg, "logconfig_json", None):
            return
        error = logging.getLogger("gunicorn.error")
        access = logging.getLogger("gunicorn.access")
        for name, source in (("fulmen", error), ("fulmen.error", error), ("fulmen.access", access)):
            logger = logging.getLogger(name)
            logger.handlers = list(source.handlers)
            logger.setLevel(source.level)
            logger.propagate = False


class FulmenH11Worker(FulmenWorker):
    """The pure-Python variant: the h11 parser on the asyncio loop (no compiled extensions)."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "asyncio", "http": "h11"}


class _WorkerServer(Server):
    """A `Server` that logs through gunicorn and follows gunicorn's exit signals."""

    quit_hint = ""  # stopping is gunicorn's to tell (its arbiter takes the Ctrl+C)

    def __init__(self, config: Config, worker: FulmenWorker) -> None:
        super().__init__(config)
        self.worker = worker

    def configure_logging(self) -> None:
        self.worker.route_logging()

    def handle_exit(self, sig: int) -> None:
        """`TERM`: graceful shutdown. `INT`/`QUIT`: quick shutdown (the running requests are
        cancelled at once), after gunicorn's `worker_int` hook. Both run the lifespan shutdown
        (within fulmen's share of `--graceful-timeout`, which the arbiter waits after either)."""
        worker = self.worker
        worker.alive = False
        if sig in QUICK_SIGNALS and not self.force_exit:
            self.force_exit = True
            worker.cfg.worker_int(worker)
        self.should_exit = True
