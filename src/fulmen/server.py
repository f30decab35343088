"""The server: load the app, run lifespan, listen, tick, and shut down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import random
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fulmen.config import Config
from fulmen.importer import ImportFromStringError, import_from_string
from fulmen.interfaces import adapt, detect_interface
from fulmen.lifespan import Lifespan
from fulmen.logging import LogConfigError, configure_with
from fulmen.loops import loop_factory
from fulmen.loops import run as run_loop
from fulmen.metrics import Metrics, start_endpoint
from fulmen.middleware.message_logger import log_messages
from fulmen.protocols import dispatch, proxy_protocol
from fulmen.protocols.linger import SHUTDOWN_GRACE
from fulmen.protocols.proxy_tls import ProxyTLSListener
from fulmen.sockets import bind_sockets, bind_udp, describe, remove_socket_files, socket_files
from fulmen.state import ServerState
from fulmen.tls import create_ssl_context
from fulmen.types import ASGIApp

if TYPE_CHECKING:
    from fulmen.protocols.quic import QuicListener

logger = logging.getLogger("fulmen.error")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How fulmen's supervisors ask their server processes to stop for a restart (`Server.restart`).
RESTART_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR2",) if hasattr(signal, name))
TICK_SECONDS = 1.0
ACCEPT_SETTLE_ITERATIONS = 4


def load_app(config: Config) -> tuple[ASGIApp, str]:
    """Import, call the factory and adapt the interface: (ASGI3 app, interface name)."""
    if isinstance(config.app, str):  # only an import needs it; an embedding program's path stays
        sys.path.insert(0, os.path.abspath(config.app_dir))
    app: Any = import_from_string(config.app)
    if config.factory:
        try:
            app = app()
        except TypeError as exc:
            raise ImportFromStringError(f"Error calling the application factory: {exc}") from None
    if not callable(app):
        raise ImportFromStringError(f"The application {config.app!r} is not callable.")
    interface = config.interface
    if interface == "auto":
        interface = detect_interface(app)
    return adapt(app, interface), interface


# Python 3.13's asyncio (and uvloop under it) removes a Unix socket's file when its server
# closes. Whose file it is, is decided here (`socket_files`): one inherited from systemd, a
# supervisor or a reloader outlives this server, and one fulmen bound is removed by fulmen.
_UNIX: dict[str, Any] = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}


def freeze_startup_objects() -> None:
    """Move the objects alive once the app has started (modules, the app, its startup state)
    out of the garbage collector's way (`gc.freeze`): its full collections, which under load
    run several times a second and stop every request while they last, then walk only what
    requests made. With 1000 connections this took them from 9.4 ms to 2.2 ms on average. The
    garbage of startup is collected first; `gc.unfreeze()` gives the objects back."""
    gc.collect()
    gc.freeze()


class Server:
    """Serve one `Config`. `await server.serve()` works inside an already running loop."""

    announce = True  # log a "Fulmen running on" line per socket (a supervisor logs them once)
    quit_hint = " (Press CTRL+C to quit)"  # after it, where the Ctrl+C is the server's to take
    # Signals that call `restart` (the server processes of fulmen's supervisors take SIGUSR2).
    restart_signals: tuple[int, ...] = ()
    # Signals that call `handle_exit`. A supervisor's server processes take SIGTERM only: a
    # Ctrl+C reaches the whole process group, and the supervisor decides what it means.
    exit_signals: tuple[int, ...] = HANDLED_SIGNALS

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = False
        self.force_exit = False
        self.lifespan: Lifespan | None = None  # set while the lifespan shutdown runs
        self.abort = False  # leave at once: no lifespan shutdown either (gunicorn's ABRT)
        self.state: ServerState | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.quic_listeners: list[QuicListener] = []  # --http3: one per TCP listener
        self._should_exit = False
        self._exit_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._socket_files: list[tuple[str, int]] = []  # (path, inode) to remove
        self.limit_max_requests: int | None = None  # with its jitter, drawn when serving
        self.metrics: Metrics | None = None  # --metrics-bind
        self.restarting = False  # the shutdown is a restart: another server takes over
        # The server owns its process (`run`, a gunicorn worker): once started, it freezes the
        # objects alive then (`freeze_startup_objects`). Not when serving inside a host's loop.
        self.owns_process = False

    @property
    def should_exit(self) -> bool:
        """Set to True (from any thread) to start a graceful shutdown."""
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._loop is not None and self._exit_event is not None:
            # The server may have stopped (and its loop closed) already: nothing left to stop.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._exit_event.set)

    def restart(self) -> None:
        """A graceful shutdown after which the service goes on (a supervisor replaces this
        server): the same, except that open WebSockets close with 1012 (service restart)
        instead of 1001 (going away), telling clients to reconnect."""
        self.restarting = True
        self.should_exit = True

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        """Run `serve()` on a new event loop of the configured kind, owning the process (see
        `freeze_startup_objects`; the objects are unfrozen when it returns)."""
        self.owns_process = True
        try:
            run_loop(self.serve(sockets), loop_factory(self.config.loop))
        finally:
            gc.unfreeze()

    def configure_logging(self) -> None:
        """Install fulmen's logging configuration. A host that owns logging overrides this
        (the gunicorn worker routes fulmen's loggers to gunicorn's handlers instead)."""
        configure_with(self.config)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        try:
            self.configure_logging()
        except LogConfigError as exc:  # fulmen's own configuration is in place: say why, stop
            logger.error("%s", exc)
            return
        self._loop = asyncio.get_running_loop()
        self._exit_event = asyncio.Event()
        if self._should_exit:
            self._exit_event.set()
        app, interface = load_app(config)  # a bad import string is one error line, nothing else
        app = log_messages(app)  # --log-level trace: every ASGI message; else app itself
        logger.info("Started server process [%d]", os.getpid())
        installed = self._install_signal_handlers()
        try:
            await self._serve(app, interface, sockets)
        finally:
            for sig in installed:
                self._loop.remove_signal_handler(sig)
        logger.info("Finished server process [%d]", os.getpid())

    async def _serve(
        self, app: ASGIApp, interface: str, sockets: list[socket.socket] | None
    ) -> None:
        config = self.config
        app_state: dict[str, Any] = {}
        lifespan = None
        if config.lifespan != "off" and interface not in ("wsgi", "consumer"):
            lifespan = Lifespan(app, config.lifespan, app_state)
            await lifespan.startup()
            if lifespan.startup_failed:
                return
        assert self._loop is not None
        if config.metrics_bind:  # off: the app is not wrapped, nothing is counted
            self.metrics = Metrics()
            app = self.metrics.instrument(app)
        self.state = ServerState(config, app, app_state, self._loop, self._max_requests)
        if config.use_http2:
            dispatch.enable_http2(self.state)
        limit = config.limit_max_requests
        if limit:  # each server (each worker process) draws its own jitter: they restart apart
            limit += random.randint(0, config.limit_max_requests_jitter)
        self.limit_max_requests = limit
        self.state.limit_max_requests = limit or 0
        try:
            await self._listen(sockets)
        except OSError as exc:
            logger.error("%s", exc)
            for server in self.servers:  # the metrics listener, if the sockets failed after it
                server.close()
            if lifespan is not None:
                await lifespan.shutdown()
            return
        self.started = True
        self._tick()
        if self.owns_process:
            freeze_startup_objects()
        assert self._exit_event is not None
        await self._exit_event.wait()
        await self.shutdown(sockets)
        if lifespan is not None and not self.abort:
            # Even after a forced exit (which only skips waiting for the requests): the app's
            # cleanup runs, within the graceful timeout. A further SIGINT abandons it.
            self.lifespan = lifespan
            await lifespan.shutdown(self.config.timeout_graceful_shutdown)

    async def _listen(self, sockets: list[socket.socket] | None) -> None:
        assert self.state is not None and self._loop is not None
        config = self.config
        # Built before binding: a certificate that cannot be loaded leaves nothing bound.
        ssl_context = create_ssl_context(config)
        tls: dict[str, Any] = {}
        if ssl_context is not None:
            # asyncio's default is 60 s: a client that never completes the handshake is closed
            # sooner (both asyncio and uvloop honour the argument).
            tls = {"ssl": ssl_context, "ssl_handshake_timeout": config.timeout_tls_handshake}
        scheme = "http" if ssl_context is None else "https"
        # `dispatch` chooses each connection's protocol: as the loop accepts it, or, over TLS
        # with HTTP/2 on, after the handshake (by its ALPN result).
        factory: Callable[[], asyncio.Protocol] = functools.partial(dispatch.connection, self.state)
        if ssl_context is not None:  # the protocol is chosen once the handshake is done
            factory = functools.partial(dispatch.tls_connection, self.state)
        if config.proxy_protocol:  # off: nothing runs before the connection's protocol
            factory = proxy_protocol.connection_factory(self.state, config.trusted_hosts)
        if self.metrics is not None and config.metrics_bind:
            await self._listen_metrics(config.metrics_bind)
        owned = sockets is None
        if sockets is None:
            sockets = bind_sockets(config)
            self._socket_files = socket_files(config, sockets)
        for sock in sockets:
            server: asyncio.AbstractServer
            if config.proxy_protocol and ssl_context is not None:  # the header comes before TLS
                server = ProxyTLSListener(
                    self.state,
                    sock,
                    ssl_context,
                    trusted_hosts=config.trusted_hosts,
                    handshake_timeout=config.timeout_tls_handshake,
                    backlog=config.backlog,
                )
            elif sock.family == socket.AF_UNIX:
                server = await self._loop.create_unix_server(factory, sock=sock, **tls, **_UNIX)
            else:
                server = await self._loop.create_server(
                    factory, sock=sock, backlog=config.backlog, **tls
                )
            self.servers.append(server)
            if self.announce and (owned or sock.family != socket.AF_UNIX):
                logger.info("Fulmen running on %s%s", describe(sock, scheme), self.quit_hint)
        if config.http3:
            await self._listen_quic(sockets, not owned or config.reuse_port)

    async def _listen_quic(self, sockets: list[socket.socket], reuse_port: bool) -> None:
        """--http3: a UDP socket on each TCP listener's address and port."""
        from fulmen.protocols.quic import QuicListener  # aioquic: only with --http3

        assert self.state is not None and self._loop is not None
        state, config = self.state, self.config
        assert config.ssl_certfile is not None
        tls = (config.ssl_certfile, config.ssl_keyfile, config.ssl_keyfile_password)
        streams = config.h2_max_concurrent_streams
        for sock in sockets:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            udp = bind_udp(sock, reuse_port)
            _, listener = await self._loop.create_datagram_endpoint(
                lambda: QuicListener(state, tls, config.http3_retry, streams), sock=udp
            )
            if not self.quic_listeners:
                state.advertise_http3(udp.getsockname()[1])
            self.quic_listeners.append(listener)
            if self.announce:
                logger.info("HTTP/3 on %s (UDP)", describe(udp, "https"))
        if not self.quic_listeners:
            raise OSError("--http3 needs a TCP listener (host and port) to share its port")

    async def _listen_metrics(self, address: str) -> None:
        assert self.metrics is not None and self.state is not None
        state = self.state
        server = await start_endpoint(
            address, self.metrics, lambda: len(state.connections), self.config.backlog
        )
        self.servers.append(server)
        for sock in server.sockets:
            logger.info("Metrics on %s/metrics", describe(sock, "http"))

    def _tick(self) -> None:
        """Once a second: refresh the date header and close timed-out connections."""
        state = self.state
        assert state is not None and self._loop is not None
        state.tick()
        # Deadlines are set from this coarse clock, which lags real time by up to one tick:
        # compare them with the clock one tick back, so a timeout never fires before it is due
        # (it fires between its value and one tick after, rounded up to the tick).
        now = state.clock - TICK_SECONDS
        for conn in list(state.connections):
            conn.check_timeout(now)
        self._tick_handle = self._loop.call_later(TICK_SECONDS, self._tick)

    def _max_requests(self) -> None:
        logger.warning(
            "Maximum request limit of %d exceeded. Terminating process.",
            self.limit_max_requests,
        )
        self.restart()  # whatever runs the server (supervisor, process manager) starts another

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting, let in-flight requests finish within the timeout, then cancel."""
        logger.info("Shutting down")
        state = self.state
        assert state is not None
        for server in self.servers:
            server.close()
        for listener in self.quic_listeners:
            listener.stop_accepting()
        # A connection accepted just before the close reaches connection_made a loop iteration
        # or two later (asyncio: an accept task, then a call_soon): let it arrive, so that it is
        # shut down like the others (its request served) rather than closed unread.
        for _ in range(ACCEPT_SETTLE_ITERATIONS):
            await asyncio.sleep(0)
        await self._wait_for_handshakes()
        state.shutting_down = True
        state.ws_shutdown_code = 1012 if self.restarting else 1001
        for conn in list(state.connections):
            conn.shutdown()
        await self._wait_for_connections()
        if state.tasks:
            logger.warning("Cancelling %d running request(s).", len(state.tasks))
            for task in list(state.tasks):
                task.cancel()
            await asyncio.wait(list(state.tasks), timeout=5)
        for conn in list(state.connections):
            conn.transport.abort()
        if self.quic_listeners:
            await asyncio.sleep(0)  # the CONNECTION_CLOSE frames of those aborted go out
            for listener in self.quic_listeners:
                listener.close()
        for server in self.servers:
            await server.wait_closed()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        remove_socket_files(self._socket_files)

    async def _wait_for_handshakes(self) -> None:
        """TLS connections accepted before the listeners closed become connections once their
        handshake is done (milliseconds): wait for them, at most `SHUTDOWN_GRACE`, so that
        they are shut down like the others, their request answered, not cut unseen."""
        state = self.state
        assert state is not None
        deadline = asyncio.get_running_loop().time() + SHUTDOWN_GRACE
        while state.handshaking and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)

    async def _wait_for_connections(self) -> None:
        state = self.state
        assert state is not None
        timeout = self.config.timeout_graceful_shutdown
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if state.connections and not self.force_exit:
            logger.info("Waiting for connections to close. (CTRL+C to force quit)")
        while (state.connections or state.tasks) and not self.force_exit:
            if deadline is not None and loop.time() >= deadline:
                logger.warning("Graceful shutdown timed out after %s seconds.", timeout)
                return
            await asyncio.sleep(0.05)

    def _install_signal_handlers(self) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []  # the embedding program owns signals
        if sys.platform == "win32":  # pragma: no cover - Windows loops take no signal handlers
            return []
        assert self._loop is not None
        for sig in self.exit_signals:
            self._loop.add_signal_handler(sig, self.handle_exit, sig)
        for restart in self.restart_signals:
            self._loop.add_signal_handler(restart, self.restart)
        return [*self.exit_signals, *self.restart_signals]

    def handle_exit(self, sig: int) -> None:
        """First SIGINT/SIGTERM: graceful shutdown. A second SIGINT: stop waiting for the
        requests (the lifespan shutdown still runs); a third: abandon the lifespan shutdown."""
        if self._should_exit and sig == signal.SIGINT:
            if self.force_exit and self.lifespan is not None:
                self.lifespan.abandon()
            self.force_exit = True
            logger.warning("Forced exit.")
        self.should_exit = True
