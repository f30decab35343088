"""`--reload`: restart the server process when watched files change. For development only.

The supervisor binds the listening sockets once and runs the server in a child process started
with multiprocessing's "spawn" context (a fresh interpreter, so the changed code is imported
anew) on those sockets. It watches files with watchfiles when it is installed, else by polling
their modification times. On a change it stops the child gracefully and starts a new one: the
sockets stay open throughout, so clients connecting meanwhile wait in the backlog instead of
being refused. A child that fails to start (a syntax error, an import error, a failed lifespan
startup) is reported and the supervisor keeps watching: saving a fix starts the server again.

Which files count (as uvicorn): those matching an include pattern (`*.py` by default) and no
exclude pattern (`.*`, `.py[cod]`, `.sw.*`, `~*` by default: hidden files, compiled files,
editor swap and backup files). Unlike uvicorn, the polling fallback applies the same patterns,
and directories matching an exclude pattern (`.git`, `.venv`, ...) are not looked into.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Generator, Iterable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Protocol

from fulmen.config import Config
from fulmen.importer import ImportFromStringError
from fulmen.logging import configure_from
from fulmen.server import RESTART_SIGNALS, Server
from fulmen.sockets import remove_socket_files
from fulmen.supervisors import listen_once

logger = logging.getLogger("fulmen.error")

STARTUP_FAILURE = 3  # as `fulmen.run`: the sockets could not be bound
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# uvicorn's defaults.
DEFAULT_INCLUDES = ("*.py",)
DEFAULT_EXCLUDES = (".*", ".py[cod]", ".sw.*", "~*")
POLL_INTERVAL = 0.5  # seconds between two scans of the polling watcher
# The longest a watcher blocks: how soon a signal or a child that died is noticed.
WATCH_STEP = 0.1
# Beyond --timeout-graceful-shutdown, a stopping child gets this long before it is killed: the
# server's own wait for the requests it cancels at the timeout (`Server.shutdown`).
STOP_GRACE = 5.0


class _Flag:
    """A stop flag that a signal handler may set: no lock, unlike `threading.Event` (whose
    lock the interrupted code may hold). watchfiles polls it through `is_set()`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


class FileFilter:
    """Which files a change to restarts the server: `--reload-include`/`--reload-exclude`.

    A file counts when it matches an include pattern and no exclude pattern (patterns match the
    end of the path, as `Path.match`: `*.py`, `templates/*.html`). An exclude that names an
    existing directory excludes everything below it. A default pattern given in the other list
    is dropped (`--reload-exclude '*.py'` watches no Python file; `--reload-include '.*'` watches
    hidden files), and a file named exactly by an include (`--reload-include .env`) counts
    despite the default excludes. Directories below a watched one whose name matches an exclude
    pattern are not looked into.
    """

    def __init__(
        self, roots: Sequence[Path], includes: Iterable[str], excludes: Iterable[str], cwd: Path
    ) -> None:
        includes, excludes = list(includes), list(excludes)
        self.roots = list(roots)
        self.includes = [p for p in DEFAULT_INCLUDES if p not in excludes] + includes
        self.exact_includes = [p for p in includes if not _is_glob(p)]
        self.default_excludes = [p for p in DEFAULT_EXCLUDES if p not in includes]
        self.excludes: list[str] = []
        self.exclude_dirs: list[Path] = []
        for pattern in excludes:
            path = cwd / pattern
            if path.is_dir():
                self.exclude_dirs.append(path.resolve())
            else:
                self.excludes.append(pattern)
        self._dir_patterns = self.excludes + self.default_excludes

    def skip_dir(self, path: Path) -> bool:
        """True for a directory below a watched one that is not looked into."""
        return path in self.exclude_dirs or any(path.match(p) for p in self._dir_patterns)

    def __call__(self, path: Path) -> bool:
        """Whether a change to the file `path` (absolute) restarts the server."""
        if not any(path.match(p) for p in self.includes):
            return False
        if any(path.match(p) for p in self.excludes):
            return False
        exact = any(path.match(p) for p in self.exact_includes)
        if not exact and any(path.match(p) for p in self.default_excludes):
            return False
        if any(d in path.parents for d in self.exclude_dirs):  # (also one above a watched one)
            return False
        root = next((r for r in self.roots if r in path.parents), None)
        if root is None:
            return False  # not below a watched directory (a watcher reports nothing else)
        return not any(self.skip_dir(root / d) for d in path.relative_to(root).parents[:-1])


class Watcher(Protocol):
    name: str

    def changes(self) -> set[Path]:
        """The files changed since the last call; blocks for a short while when there are
        none yet, and returns at once when the stop flag is set."""

    def close(self) -> None: ...


class WatchFilesWatcher:
    """Change notifications from the OS (inotify, FSEvents, ...) through watchfiles."""

    name = "WatchFiles"

    def __init__(self, roots: Sequence[Path], file_filter: FileFilter, stop: _Flag) -> None:
        import watchfiles

        self._watch: Generator[set[tuple[watchfiles.Change, str]], None, None] = watchfiles.watch(
            *roots,
            watch_filter=lambda _change, path: file_filter(Path(path)),
            stop_event=stop,
            rust_timeout=int(WATCH_STEP * 1000),
            yield_on_timeout=True,
        )
        # The first call starts the watching (it returns after one step): a change made once
        # this constructor returned is seen.
        next(self._watch, None)

    def changes(self) -> set[Path]:
        return {Path(path) for _change, path in next(self._watch, set())}

    def close(self) -> None:
        self._watch.close()  # leaves the generator's `with RustNotify(...)`: its thread stops


class PollingWatcher:
    """Without watchfiles: the watched files' modification times, every POLL_INTERVAL."""

    name = "StatReload"

    def __init__(self, roots: Sequence[Path], file_filter: FileFilter, stop: _Flag) -> None:
        self._roots = roots
        self._filter = file_filter
        self._stop = stop
        self._stats = self._scan()
        self._next_scan = time.monotonic() + POLL_INTERVAL

    def _scan(self) -> dict[Path, tuple[int, int]]:
        found = {}
        for root in self._roots:
            for dirpath, dirnames, filenames in os.walk(root):
                here = Path(dirpath)
                dirnames[:] = [d for d in dirnames if not self._filter.skip_dir(here / d)]
                for name in filenames:
                    path = here / name
                    if not self._filter(path):
                        continue
                    try:
                        stat = path.stat()
                    except OSError:  # pragma: no cover - removed since it was listed
                        continue
                    # The size too: two writes within the file system's timestamp granularity.
                    found[path] = (stat.st_mtime_ns, stat.st_size)
        return found

    def changes(self) -> set[Path]:
        while not self._stop.value and (wait := self._next_scan - time.monotonic()) > 0:
            time.sleep(min(wait, WATCH_STEP))
        if self._stop.value:
            return set()
        self._next_scan = time.monotonic() + POLL_INTERVAL
        before, self._stats = self._stats, self._scan()
        changed = {path for path, stat in self._stats.items() if before.get(path) != stat}
        return changed | (before.keys() - self._stats.keys())

    def close(self) -> None:
        pass


def make_watcher(roots: Sequence[Path], file_filter: FileFilter, stop: _Flag) -> Watcher:
    """watchfiles' watcher when it is installed, else the polling one."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        return PollingWatcher(roots, file_filter, stop)
    return WatchFilesWatcher(roots, file_filter, stop)


def watch_roots(config: Config, cwd: Path) -> list[Path]:
    """The directories to watch, recursively: each `--reload-dir` that exists, else the current
    directory and `--app-dir`; one inside another is left out (watching it is redundant)."""
    wanted = [cwd / d for d in config.reload_dirs] or [cwd, cwd / config.app_dir]
    found = []
    for path in wanted:
        if path.is_dir():
            found.append(path.resolve())
        else:
            logger.warning("Reload directory %s is not a directory; not watched.", path)
    if not found:
        logger.warning("No reload directory exists; watching the current directory.")
        found = [cwd.resolve()]
    unique = set(found)
    return sorted(path for path in unique if not any(p in path.parents for p in unique))


def _display(path: Path, cwd: Path) -> str:
    try:
        return repr(str(path.relative_to(cwd)))
    except ValueError:
        return repr(str(path))


def serve_child(config: Config, sockets: list[socket.socket]) -> None:
    """The server process: serve on the supervisor's sockets until told to stop.

    Exits with status 1 when the application cannot be imported and 3 when it fails to start.
    """
    # A Ctrl+C reaches the whole process group: leave it to the supervisor, which stops this
    # process with SIGTERM (and kills it on a second Ctrl+C). Taken here too, one SIGINT would
    # count as a second signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = Server(config)
    server.announce = False  # the reload supervisor has logged the sockets once
    server.exit_signals = (signal.SIGTERM,)
    server.restart_signals = RESTART_SIGNALS  # a reload: WebSockets close with 1012
    try:
        server.run(sockets)
    except ImportFromStringError as exc:
        logger.error("Error loading ASGI app. %s", exc)
        sys.exit(1)
    except Exception:  # an error raised by the application's module: its traceback
        logger.exception("Error loading ASGI app.")
        sys.exit(1)
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class ChangeReload:
    """Run the server in a child process and restart it whenever a watched file changes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop = _Flag()
        self.process: BaseProcess | None = None
        self.sockets: list[socket.socket] = []
        self._stopping: BaseProcess | None = None
        self._reported = False
        self._context = multiprocessing.get_context("spawn")
        self._cwd = Path.cwd()

    def run(self) -> int:
        """Supervise until SIGINT or SIGTERM; the exit status (3: the sockets could not be
        bound)."""
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # "spawn" runs the main module again in the server process, before the server (the
            # flag multiprocessing itself checks): an unguarded script calls run() again.
            raise RuntimeError(
                "fulmen.run(..., reload=True) ran again in the server process, which imports "
                "the main module: call it under `if __name__ == '__main__':`"
            )
        config = self.config
        if not configure_from(config):
            return STARTUP_FAILURE
        roots = watch_roots(config, self._cwd)
        file_filter = FileFilter(roots, config.reload_includes, config.reload_excludes, self._cwd)
        try:
            self.sockets, files = listen_once(config)
        except OSError as exc:
            logger.error("%s", exc)
            return STARTUP_FAILURE
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        try:
            logger.info("Will watch for changes in these directories: %s", list(map(str, roots)))
            watcher = make_watcher(roots, file_filter, self.stop)
            if isinstance(watcher, PollingWatcher):
                logger.warning(
                    "watchfiles is not installed: polling for changes every %s s.", POLL_INTERVAL
                )
            logger.info("Started reloader process [%d] using %s", os.getpid(), watcher.name)
            try:
                self._loop(watcher)
            finally:
                watcher.close()
                self._stop_child()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sock in self.sockets:
                sock.close()
            remove_socket_files(files)
        logger.info("Stopping reloader process [%d]", os.getpid())
        return 0

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        stopping = self._stopping
        if self.stop.value and stopping is not None:
            # A second CTRL+C (or SIGTERM) while the server process shuts down: at once.
            logger.warning("Forced exit: killing server process [%s].", stopping.pid)
            stopping.kill()
        self.stop.value = True

    def _loop(self, watcher: Watcher) -> None:
        self._start()
        while changes := self._next_changes(watcher):
            names = ", ".join(_display(path, self._cwd) for path in sorted(changes))
            logger.warning("%s detected changes in %s. Reloading...", watcher.name, names)
            self._stop_child(restart=True)
            if not self.stop.value:
                self._start()

    def _next_changes(self, watcher: Watcher) -> set[Path]:
        """The next changes, gathered for --reload-delay after the first one (an editor saving
        several files, a `git checkout`: one restart for them all); empty once stopping."""
        changes: set[Path] = set()
        deadline = None
        while not self.stop.value:
            changes |= watcher.changes()
            self._check_child()
            if changes and deadline is None:
                deadline = time.monotonic() + self.config.reload_delay
            if deadline is not None and time.monotonic() >= deadline:
                return changes
        return set()

    def _start(self) -> None:
        process = self._context.Process(
            target=serve_child, args=(self.config, self.sockets), name="fulmen-server"
        )
        process.start()
        self.process = process
        self._reported = False

    def _check_child(self) -> None:
        process = self.process
        if process is None or self._reported or self.stop.value or process.is_alive():
            return  # (a child stopping with the supervisor, on the same CTRL+C, is no news)
        if process.exitcode == 0:  # it served, then stopped by itself (--limit-max-requests)
            logger.info("Server process [%d] exited; starting a new one.", process.pid)
            process.close()
            self._start()
            return
        self._reported = True
        logger.error(
            "Server process [%d] exited with code %s. Waiting for changes to restart it.",
            process.pid,
            process.exitcode,
        )

    def _stop_child(self, restart: bool = False) -> None:
        """Stop the server process gracefully (SIGTERM; for a `restart`, the signal that
        tells it so), killing it if it takes too long."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.is_alive():
            self._stopping = process  # first: once the line below is out, a 2nd signal kills it
            logger.debug("Stopping server process [%d].", process.pid)
            if restart and RESTART_SIGNALS and process.pid is not None:
                os.kill(process.pid, RESTART_SIGNALS[0])
            else:
                process.terminate()
            timeout = self.config.timeout_graceful_shutdown
            process.join(None if timeout is None else timeout + STOP_GRACE)
            if process.is_alive():
                logger.warning("Server process [%d] did not stop in time: killing it.", process.pid)
                process.kill()
                process.join()
            self._stopping = None
        process.close()
