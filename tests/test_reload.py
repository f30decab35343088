"""`--reload`: real `python -m fulmen --reload` processes serving an app module in a temp dir.

Each test edits files, then waits for the supervisor's log lines ("... detected changes in ...",
a new server process starting) and for the server to answer with the new content. That a
change does *not* restart is shown by order: the ignored changes are made first, then a
watched one, and the one restart that follows names only the watched file.
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
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import fulmen
from fulmen.config import Config
from fulmen.supervisors.reload import FileFilter, _display, watch_roots
from tests.conftest import TIMEOUT
from tests.helpers import ROOT, Fulmen, Lines, clean_env, run_fulmen

APP = """
import time

BODY = {body!r}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        if {fail_startup!r}:
            await send({{"type": "lifespan.startup.failed", "message": "not today"}})
            return
        await send({{"type": "lifespan.startup.complete"}})
        await receive()
        await send({{"type": "lifespan.shutdown.complete"}})
        return
    if scope["type"] == "websocket":
        await receive()
        await send({{"type": "websocket.accept"}})
        await receive()
        return
    if scope["path"] == "/block":
        print("blocking the loop", flush=True)
        time.sleep(30)  # the event loop cannot even handle SIGTERM meanwhile
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": BODY.encode()}})
"""

SERVING = r"Started server process \[(\d+)\]"


def write_app(directory: Path, body: str, *, fail_startup: bool = False) -> None:
    (directory / "app.py").write_text(APP.format(body=body, fail_startup=fail_startup))


def wait_nth(proc: Fulmen, pattern: str, n: int) -> re.Match[str]:
    """The `n`-th stderr line (from 1) matching `pattern`, once there is one (bounded)."""
    regex = re.compile(pattern)
    lines = proc.stderr
    deadline = time.monotonic() + TIMEOUT
    with lines._cond:
        while True:
            found = [match for match in map(regex.search, lines.lines) if match]
            if len(found) >= n:
                return found[n - 1]
            remaining = deadline - time.monotonic()
            if lines.closed or remaining <= 0:
                raise AssertionError(f"no {n} lines matching {pattern!r} in:\n{lines.text}")
            lines._cond.wait(remaining)


def matching(proc: Fulmen, pattern: str) -> list[str]:
    return [line for line in proc.stderr.text.splitlines() if re.search(pattern, line)]


def get(proc: Fulmen, path: str = "/") -> str:
    return httpx.get(proc.url + path, timeout=TIMEOUT).text


@contextlib.contextmanager
def reloader(appdir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Fulmen]:
    """`fulmen app:app --reload` importing from `appdir`; the port is picked by the system."""
    options = ("--app-dir", str(appdir), "--port", "0", "--lifespan", "on", "--reload")
    with Fulmen("app:app", *options, *args, env=env) as proc:
        yield proc


@pytest.fixture
def appdir(tmp_path: Path) -> Path:
    write_app(tmp_path, "one")
    return tmp_path


def test_a_change_restarts_the_server_on_the_same_socket(appdir: Path) -> None:
    with reloader(appdir, "--reload-dir", str(appdir)) as proc:
        proc.stderr.wait_for("Started reloader process .* using WatchFiles")
        first = wait_nth(proc, SERVING, 1).group(1)
        assert get(proc) == "one"
        write_app(appdir, "two")
        changed = proc.stderr.wait_for("WatchFiles detected changes in (.*). Reloading...")
        assert changed.group(1) == repr(str(appdir / "app.py"))
        second = wait_nth(proc, SERVING, 2).group(1)
        assert second != first
        assert get(proc) == "two"  # the same address: the socket stayed open
        # The old process was stopped gracefully (lifespan shutdown), before the new one.
        lines = proc.stderr.lines
        finished = lines.index(f"INFO:     Finished server process [{first}]")
        assert finished < lines.index(f"INFO:     Started server process [{second}]")
        assert "Application shutdown complete." in proc.stderr.text


def test_polling_when_watchfiles_is_not_installed(appdir: Path, tmp_path_factory) -> None:
    blocker = tmp_path_factory.mktemp("no_watchfiles")
    (blocker / "watchfiles.py").write_text("raise ImportError('not installed, for this test')\n")
    path = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    with reloader(appdir, "--reload-dir", str(appdir), env=clean_env(PYTHONPATH=path)) as proc:
        proc.stderr.wait_for("watchfiles is not installed: polling for changes every 0.5 s")
        proc.stderr.wait_for("Started reloader process .* using StatReload")
        wait_nth(proc, SERVING, 1)
        assert get(proc) == "one"
        (appdir / "ignored.txt").write_text("not a watched file")
        write_app(appdir, "two!")
        changed = proc.stderr.wait_for("StatReload detected changes in (.*). Reloading...")
        assert changed.group(1) == repr(str(appdir / "app.py"))
        wait_nth(proc, SERVING, 2)
        assert get(proc) == "two!"
        (appdir / "app.py").unlink()  # a removed file is a change too
        changed = wait_nth(proc, "StatReload detected changes in (.*). Reloading...", 2)
        assert changed.group(1) == repr(str(appdir / "app.py"))
        wait_nth(proc, "Error loading ASGI app", 1)


def test_excluded_files_do_not_restart(appdir: Path) -> None:
    (appdir / "skipped").mkdir()
    (appdir / ".cache").mkdir()
    excludes = ("--reload-exclude", "ignored_*.py", "--reload-exclude", str(appdir / "skipped"))
    with reloader(appdir, "--reload-dir", str(appdir), *excludes) as proc:
        wait_nth(proc, SERVING, 1)
        ignored = [
            "ignored_by_pattern.py",  # --reload-exclude 'ignored_*.py'
            "skipped/module.py",  # --reload-exclude DIR
            ".hidden.py",  # the default excludes: '.*'
            "compiled.pyc",  # '.py[cod]'
            "~backup.py",  # '~*'
            ".cache/module.py",  # a hidden directory is not looked into
            "notes.txt",  # not included: only '*.py' by default
        ]
        for name in ignored:
            (appdir / name).write_text("x = 1\n")
        (appdir / "watched.py").write_text("x = 1\n")
        changed = proc.stderr.wait_for("detected changes in (.*). Reloading...")
        assert changed.group(1) == repr(str(appdir / "watched.py"))


def test_included_patterns_restart(appdir: Path) -> None:
    includes = ("--reload-include", "*.txt", "--reload-include", ".env")
    with reloader(appdir, "--reload-dir", str(appdir), *includes) as proc:
        wait_nth(proc, SERVING, 1)
        (appdir / "notes.txt").write_text("a glob include")
        changed = proc.stderr.wait_for("detected changes in (.*). Reloading...")
        assert changed.group(1) == repr(str(appdir / "notes.txt"))
        wait_nth(proc, SERVING, 2)
        # Named exactly, a hidden file counts despite the default '.*' exclude.
        (appdir / ".env").write_text("DEBUG=1")
        changed = wait_nth(proc, "detected changes in (.*). Reloading...", 2)
        assert changed.group(1) == repr(str(appdir / ".env"))


def test_reload_dir_limits_what_is_watched(appdir: Path) -> None:
    watched = appdir / "watched"
    watched.mkdir()
    missing = appdir / "missing"
    with reloader(appdir, "--reload-dir", str(watched), "--reload-dir", str(missing)) as proc:
        proc.stderr.wait_for(f"Reload directory {re.escape(str(missing))} is not a directory")
        proc.stderr.wait_for(
            re.escape(f"Will watch for changes in these directories: {[str(watched)]}")
        )
        wait_nth(proc, SERVING, 1)
        write_app(appdir, "outside the watched directory")
        (watched / "module.py").write_text("x = 1\n")
        changed = proc.stderr.wait_for("detected changes in (.*). Reloading...")
        assert changed.group(1) == repr(str(watched / "module.py"))
        wait_nth(proc, SERVING, 2)
        assert get(proc) == "outside the watched directory"


def test_by_default_the_current_and_app_directories_are_watched(appdir: Path) -> None:
    with reloader(appdir) as proc:
        dirs = sorted([str(ROOT), str(appdir)])
        proc.stderr.wait_for(re.escape(f"Will watch for changes in these directories: {dirs}"))
        wait_nth(proc, SERVING, 1)
        write_app(appdir, "two")
        # (Other changes in the repository may restart the server too.)
        proc.stderr.wait_for(f"detected changes in .*{re.escape(repr(str(appdir / 'app.py')))}")


def test_without_any_reload_dir_the_current_directory_is_watched(appdir: Path) -> None:
    with reloader(appdir, "--reload-dir", str(appdir / "missing")) as proc:
        proc.stderr.wait_for("No reload directory exists; watching the current directory.")
        proc.stderr.wait_for(
            re.escape(f"Will watch for changes in these directories: {[str(ROOT)]}")
        )


BROKEN = {
    "syntax error": ("def app(:\n", "Error loading ASGI app.", 1),
    "no app attribute": ("application = None\n", 'Attribute "app" not found', 1),
    "lifespan startup failure": (None, "not today", 3),
}


@pytest.mark.parametrize("broken", BROKEN, ids=list(BROKEN))
def test_a_broken_app_is_reported_and_a_fix_restarts(appdir: Path, broken: str) -> None:
    source, error, code = BROKEN[broken]
    with reloader(appdir, "--reload-dir", str(appdir)) as proc:
        wait_nth(proc, SERVING, 1)
        if source is None:
            write_app(appdir, "failing", fail_startup=True)
        else:
            (appdir / "app.py").write_text(source)
        proc.stderr.wait_for(error)
        proc.stderr.wait_for(
            rf"Server process \[\d+\] exited with code {code}. Waiting for changes to restart it."
        )
        write_app(appdir, "fixed")
        wait_nth(proc, SERVING, 2)
        assert get(proc) == "fixed"
        assert proc.proc.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_the_server_and_the_supervisor(appdir: Path, sig: signal.Signals) -> None:
    with reloader(appdir, "--reload-dir", str(appdir)) as proc:
        pid = int(wait_nth(proc, SERVING, 1).group(1))
        assert get(proc) == "one"
        proc.signal(sig)
        assert proc.wait() == 0
        text = proc.stderr.text
        assert f"Finished server process [{pid}]" in text  # gracefully
        assert "Stopping reloader process" in text
        assert "exited with code" not in text
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_websockets_close_with_1012_on_a_reload_and_1001_on_a_stop(appdir: Path) -> None:
    with reloader(appdir, "--reload-dir", str(appdir)) as proc:
        wait_nth(proc, SERVING, 1)
        url = f"ws://127.0.0.1:{proc.port}/"
        with connect(url, open_timeout=TIMEOUT) as ws:
            write_app(appdir, "two")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        wait_nth(proc, SERVING, 2)
        with connect(url, open_timeout=TIMEOUT) as ws:
            proc.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proc.wait() == 0


def _block(proc: Fulmen) -> socket.socket:
    """A request that blocks the server's event loop for 30 s, once it has started."""
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=TIMEOUT)
    sock.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
    proc.stdout.wait_for("blocking the loop")
    return sock


def test_a_second_signal_kills_a_stuck_server(appdir: Path) -> None:
    args = ("--reload-dir", str(appdir), "--log-level", "debug")
    with reloader(appdir, *args) as proc:
        pid = int(wait_nth(proc, SERVING, 1).group(1))
        with _block(proc):
            proc.signal(signal.SIGTERM)
            proc.stderr.wait_for(rf"Stopping server process \[{pid}\]")
            started = time.monotonic()
            proc.signal(signal.SIGINT)
            assert proc.wait() == 0
            assert time.monotonic() - started < TIMEOUT
        assert f"Forced exit: killing server process [{pid}]" in proc.stderr.text
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_a_stuck_server_is_killed_after_the_graceful_timeout(appdir: Path) -> None:
    args = ("--reload-dir", str(appdir), "--timeout-graceful-shutdown", "0")
    with reloader(appdir, *args) as proc:
        pid = int(wait_nth(proc, SERVING, 1).group(1))
        with _block(proc):
            write_app(appdir, "two")
            # --timeout-graceful-shutdown 0, then 5 s for the cancelled requests, then killed.
            proc.stderr.wait_for(
                rf"Server process \[{pid}\] did not stop in time: killing it.", timeout=TIMEOUT
            )
        wait_nth(proc, SERVING, 2)
        assert get(proc) == "two"


def test_changes_within_the_delay_give_one_restart(appdir: Path) -> None:
    with reloader(appdir, "--reload-dir", str(appdir), "--reload-delay", "2") as proc:
        wait_nth(proc, SERVING, 1)
        (appdir / "first.py").write_text("x = 1\n")
        time.sleep(0.3)  # a second change, well within the delay after the first
        write_app(appdir, "two")
        changed = proc.stderr.wait_for("detected changes in (.*). Reloading...")
        assert changed.group(1) == f"{str(appdir / 'app.py')!r}, {str(appdir / 'first.py')!r}"
        wait_nth(proc, SERVING, 2)
        assert get(proc) == "two"
        assert len(matching(proc, "detected changes in")) == 1


def test_reload_over_a_unix_socket(appdir: Path) -> None:
    path = appdir / "fulmen.sock"
    args = ("--uds", str(path), "--reload-dir", str(appdir))
    with Fulmen("app:app", "--app-dir", str(appdir), "--reload", *args, wait_started=False) as p:
        p.stderr.wait_for(f"Fulmen running on http on unix socket {re.escape(str(path))}")
        wait_nth(p, SERVING, 1)
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
            assert client.get("http://fulmen/").text == "one"
            write_app(appdir, "two")
            wait_nth(p, SERVING, 2)
            assert client.get("http://fulmen/").text == "two"
        p.signal(signal.SIGTERM)
        assert p.wait() == 0
    assert not path.exists()


def test_a_server_that_stops_by_itself_is_started_again(appdir: Path) -> None:
    with reloader(appdir, "--reload-dir", str(appdir), "--limit-max-requests", "1") as proc:
        first = wait_nth(proc, SERVING, 1).group(1)
        assert get(proc) == "one"
        proc.stderr.wait_for(rf"Server process \[{first}\] exited; starting a new one.")
        assert wait_nth(proc, SERVING, 2).group(1) != first
        assert get(proc) == "one"
        assert "Reloading" not in proc.stderr.text


def test_an_address_in_use_is_a_startup_failure(appdir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        result = run_fulmen("app:app", "--app-dir", str(appdir), "--reload", "--port", port)
    assert result.returncode == 3
    assert "Address already in use" in result.stderr


def test_an_unguarded_script_is_told_to_guard_the_call(appdir: Path) -> None:
    script = appdir / "script.py"
    script.write_text(
        "import fulmen\n"
        f"fulmen.run('app:app', reload=True, app_dir={str(appdir)!r}, port=0,"
        f" reload_dirs=[{str(appdir)!r}])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=appdir,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        lines = Lines(proc.stderr)
        lines.wait_for("ran again in the server process, which imports the main module")
        lines.wait_for("call it under `if __name__ == '__main__':`")
        lines.wait_for(r"Server process \[\d+\] exited with code 1")
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0
        lines.join()
        assert lines.text.count("Started reloader process") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# Configuration


def test_reload_with_workers_is_a_usage_error(appdir: Path) -> None:
    result = run_fulmen("app:app", "--app-dir", str(appdir), "--reload", "--workers", "2")
    assert result.returncode == 2
    assert "--reload and --workers 2 cannot be used together" in result.stderr


def test_reload_runs_one_server_process_whatever_web_concurrency(monkeypatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    assert Config("app:app", reload=True).workers == 1
    with pytest.raises(ValueError, match="--reload and --workers 3"):
        Config("app:app", reload=True, workers=3)


def test_reload_needs_an_import_string() -> None:
    async def app(scope, receive, send) -> None:  # pragma: no cover - never served
        pass

    with pytest.raises(ValueError, match="--reload needs the application as an import string"):
        fulmen.run(app, reload=True)


def test_one_string_is_one_value() -> None:
    config = Config("app:app", reload=True, reload_dirs="src", reload_excludes=("a", "b"))
    assert (config.reload_dirs, config.reload_excludes) == (["src"], ["a", "b"])


def test_reload_delay_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="reload_delay must not be negative"):
        Config("app:app", reload=True, reload_delay=-1)


def test_reload_options_from_the_environment(appdir: Path) -> None:
    env = clean_env(
        FULMEN_RELOAD="true",
        FULMEN_RELOAD_DIRS=f"{appdir}\n{appdir / 'missing'}",
        FULMEN_RELOAD_INCLUDES="*.txt",
    )
    with reloader(appdir, env=env) as proc:
        proc.stderr.wait_for(
            re.escape(f"Will watch for changes in these directories: {[str(appdir)]}")
        )
        wait_nth(proc, SERVING, 1)
        (appdir / "notes.txt").write_text("included")
        changed = proc.stderr.wait_for("detected changes in (.*). Reloading...")
        assert changed.group(1) == repr(str(appdir / "notes.txt"))


# The file filter and the watched directories, in this process


def _filter(root: Path, includes: list[str], excludes: list[str]) -> FileFilter:
    return FileFilter([root], includes, excludes, root)


def test_a_default_given_as_the_opposite_is_dropped(tmp_path: Path) -> None:
    no_python = _filter(tmp_path, [], ["*.py"])
    assert not no_python(tmp_path / "app.py")
    hidden = _filter(tmp_path, [".*"], [])
    assert hidden(tmp_path / ".hidden.py")
    assert hidden(tmp_path / ".config" / "settings.py")  # nor are hidden directories skipped


def test_excludes_win_over_includes(tmp_path: Path) -> None:
    file_filter = _filter(tmp_path, ["*.html", "settings.toml"], ["templates/*", "*.toml"])
    assert file_filter(tmp_path / "page.html")
    assert not file_filter(tmp_path / "templates" / "page.html")
    assert not file_filter(tmp_path / "settings.toml")


def test_an_excluded_directory_excludes_all_below_it(tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    file_filter = FileFilter([tmp_path / "build" / "lib"], [], ["build"], tmp_path)
    assert not file_filter(tmp_path / "build" / "lib" / "module.py")


def test_only_files_below_a_watched_directory_count(tmp_path: Path) -> None:
    file_filter = _filter(tmp_path / "watched", [], [])
    assert file_filter(tmp_path / "watched" / "app.py")
    assert not file_filter(tmp_path / "elsewhere" / "app.py")


def test_a_directory_inside_another_is_watched_once(tmp_path: Path, caplog) -> None:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    config = Config("app:app", reload_dirs=["src", "src/pkg", str(tmp_path / "src")])
    assert watch_roots(config, tmp_path) == [tmp_path / "src"]
    config = Config("app:app", app_dir="src")
    assert watch_roots(config, tmp_path) == [tmp_path]
    with caplog.at_level(logging.WARNING, logger="fulmen.error"):
        config = Config("app:app", reload_dirs=["nowhere"])
        assert watch_roots(config, tmp_path) == [tmp_path]
    assert "No reload directory exists" in caplog.text


def test_changed_files_are_named_from_the_current_directory(tmp_path: Path) -> None:
    assert _display(tmp_path / "pkg" / "app.py", tmp_path) == "'pkg/app.py'"
    assert _display(Path("/elsewhere/app.py"), tmp_path) == "'/elsewhere/app.py'"
