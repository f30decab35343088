"""Binding: `--bind` forms, several listeners at once, SO_REUSEPORT, IPv6 and dual stack,
inherited fds of any family, systemd socket activation, and socket file cleanup."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from fulmen import Config, sockets
from fulmen.addresses import Address, parse_bind
from fulmen.sockets import (
    bind_sockets,
    bind_unix,
    describe,
    from_fd,
    remove_socket_files,
    socket_files,
    systemd_sockets,
)
from tests.conftest import TIMEOUT
from tests.helpers import (
    ROOT,
    STARTED,
    Fulmen,
    Lines,
    clean_env,
    ipv6_available,
    run_fulmen,
)


async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


needs_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")


@contextmanager
def bound(**options: object) -> Iterator[list[socket.socket]]:
    socks = bind_sockets(Config(app, **options))
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, uds: str | None = None) -> str:
    transport = httpx.HTTPTransport(uds=uds) if uds else None
    with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
        return client.get(url).text


# --bind


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8000", Address("tcp", host="127.0.0.1", port=8000)),
        ("localhost:0", Address("tcp", host="localhost", port=0)),
        ("[::]:8001", Address("tcp", host="::", port=8001)),
        ("[::1]:65535", Address("tcp", host="::1", port=65535)),
        ("unix:/run/app.sock", Address("unix", path="/run/app.sock")),
        ("unix:relative dir/a.sock", Address("unix", path="relative dir/a.sock")),
        ("fd://3", Address("fd", fd=3)),
    ],
)
def test_bind_forms(value, expected) -> None:
    assert parse_bind(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1", "expected HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N"),
        (":8000", "expected HOST:PORT"),
        ("host:http", "expected HOST:PORT"),
        ("127.0.0.1:70000", "port must be between 0 and 65535"),
        ("::1:8000", "write an IPv6 address in brackets, as [::1]:8000"),
        ("unix:", "unix:PATH needs a path"),
        ("fd://three", "fd://N needs a file descriptor number"),
    ],
)
def test_malformed_bind_is_a_config_error(value, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(app, bind=[value])


def test_repeated_bind_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="the same address is given twice"):
        Config(app, bind=["unix:/tmp/a.sock", "127.0.0.1:1", "unix:/tmp/a.sock"])


def test_malformed_bind_is_a_usage_error() -> None:
    result = run_fulmen("tests.apps:app", "--bind", "localhost")
    assert result.returncode == 2
    assert "--bind 'localhost': expected HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_several_binds_served_at_once(tmp_path) -> None:
    path = str(tmp_path / "also.sock")
    args = ("--bind", "127.0.0.1:0", "--bind", f"unix:{path}", "--host", "0.0.0.0", "--uds", "x")
    with Fulmen("tests.apps:app", *args, "--lifespan", "off") as server:
        server.stderr.wait_for(re.escape(f"Fulmen running on http on unix socket {path} "))
        assert server.url.startswith("http://127.0.0.1:")  # --host is replaced by --bind
        assert get(server.url + "/tcp") == "/tcp"
        assert get("http://localhost/unix", uds=path) == "/unix"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    running = [line for line in server.stderr.lines if "Fulmen running on" in line]
    assert len(running) == 2
    assert not os.path.exists(path)  # created by fulmen, removed by fulmen
    assert not os.path.exists(ROOT / "x")  # --uds was replaced too


def test_failed_bind_leaves_nothing_behind(tmp_path) -> None:
    path = str(tmp_path / "first.sock")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as caught:
            bind_sockets(Config(app, bind=[f"unix:{path}", f"127.0.0.1:{port}"]))
    assert caught.value.errno == errno.EADDRINUSE
    assert not os.path.exists(path)


# SO_REUSEPORT


def test_reuse_port_lets_two_sockets_share_a_port() -> None:
    with bound(port=0, reuse_port=True) as first:
        port = first[0].getsockname()[1]
        with bound(port=port, reuse_port=True) as second:
            assert second[0].getsockname()[1] == port
        with pytest.raises(OSError) as caught, bound(port=port):  # off by default
            pass
        assert caught.value.errno == errno.EADDRINUSE


def test_reuse_port_lets_two_servers_share_a_port() -> None:
    common = ("tests.apps:app", "--reuse-port", "--lifespan", "off")
    with (
        Fulmen(*common, "--port", "0") as first,
        Fulmen(*common, "--port", str(first.port)) as second,
    ):
        assert second.port == first.port
        assert get(second.url + "/shared") == "/shared"


# IPv6


@needs_ipv6
def test_ipv6_bind_and_description() -> None:
    with bound(bind=["[::1]:0"]) as (sock,):
        assert sock.family == socket.AF_INET6
        port = sock.getsockname()[1]
        assert describe(sock) == f"http://[::1]:{port}"
        assert describe(sock, "https") == f"https://[::1]:{port}"
    with bound(host="[::1]", port=0) as (sock,):  # brackets are optional in --host
        assert sock.getsockname()[0] == "::1"


@needs_ipv6
def test_ipv6_wildcard_is_dual_stack() -> None:
    with bound(host="::", port=0) as (sock,):
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            pass  # an IPv4 client reaches the IPv6 socket


@needs_ipv6
def test_ipv4_and_ipv6_wildcards_on_one_port() -> None:
    port = free_port()
    with bound(bind=[f"0.0.0.0:{port}", f"[::]:{port}"]) as (v4, v6):
        assert v4.family == socket.AF_INET
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


@needs_ipv6
def test_ipv6_served(tmp_path) -> None:
    with Fulmen("tests.apps:app", "--bind", "[::1]:0", "--lifespan", "off") as server:
        assert server.url.startswith("http://[::1]:")
        assert get(server.url + "/v6") == "/v6"


# Inherited file descriptors


@pytest.mark.parametrize("family", ["inet", "unix"])
def test_fd_family_is_detected(family, tmp_path) -> None:
    if family == "unix":
        original = socket.socket(socket.AF_UNIX)
        original.bind(str(tmp_path / "fd.sock"))
    else:
        original = socket.socket(socket.AF_INET)
        original.bind(("127.0.0.1", 0))
    with original, bound(bind=[f"fd://{os.dup(original.fileno())}"]) as (sock,):
        assert sock.family == original.family
        assert sock.getsockname() == original.getsockname()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)  # listening
        assert socket_files(Config(app, fd=sock.fileno()), [sock]) == []  # not ours to remove


def test_fd_that_is_no_stream_socket(tmp_path) -> None:
    read, write = os.pipe()
    try:
        with pytest.raises(OSError, match=f"file descriptor {read}: Socket operation on non"):
            from_fd(read, 10)
    finally:
        os.close(read)
        os.close(write)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        fd = os.dup(udp.fileno())  # closed by from_fd, as any fd handed over
        with pytest.raises(OSError, match=f"file descriptor {fd} is not a stream socket"):
            from_fd(fd, 10)
        with pytest.raises(OSError):
            os.fstat(fd)


# Unix socket files


def test_socket_file_replaced_by_another_server_is_kept(tmp_path) -> None:
    path = str(tmp_path / "app.sock")
    config = Config(app, uds=path)
    old = bind_unix(path, 10)
    files = socket_files(config, [old])
    assert [name for name, _ in files] == [path]
    new = bind_unix(path, 10)  # a new server takes over the path (a restart)
    with old, new:
        remove_socket_files(files)  # the old one shuts down
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        remove_socket_files(socket_files(config, [new]))
        assert not os.path.exists(path)


def test_unix_socket_in_a_missing_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        bind_unix(str(tmp_path / "missing" / "app.sock"), 10)


# systemd socket activation


def test_systemd_sockets_of_any_family_replace_host_and_port(tmp_path) -> None:
    path = str(tmp_path / "systemd.sock")
    inet = socket.socket(socket.AF_INET)
    unix = socket.socket(socket.AF_UNIX)
    with inet, unix:
        inet.bind(("127.0.0.1", 0))
        inet.listen()
        unix.bind(path)
        unix.listen()
        fds = (inet.fileno(), unix.fileno())
        # As systemd does: the sockets at fds 3 and 4 and LISTEN_PID set to the exec'd process.
        wrapper = (
            "import fcntl, os, sys\n"
            f"high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in {fds!r}]\n"
            f"for fd in {fds!r}: os.close(fd)\n"
            "for target, fd in enumerate(high, 3): os.dup2(fd, target); os.close(fd)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "os.execv(sys.executable, [sys.executable, '-m', 'fulmen', *sys.argv[1:]])\n"
        )
        args = ["tests.apps_binding:environment", "--port", str(free_port()), "--lifespan", "off"]
        env = clean_env(LISTEN_FDS="2", LISTEN_FDNAMES="web:admin")
        proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=fds,
        )
        assert proc.stderr is not None
        stderr = Lines(proc.stderr)
        try:
            url = stderr.wait_for(STARTED).group(1)
            stderr.wait_for(re.escape(f"Fulmen running on http on unix socket {path} "))
            assert url == f"http://127.0.0.1:{inet.getsockname()[1]}"  # not --port
            unset = "http LISTEN_PID=-,LISTEN_FDS=-,LISTEN_FDNAMES=-"
            assert get(url) == unset
            assert get("http://localhost/", uds=path) == unset
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
            stderr.join()
            proc.stderr.close()
        assert len([line for line in stderr.lines if "Fulmen running on" in line]) == 2
        assert os.path.exists(path)  # systemd's socket file is systemd's to remove


def test_systemd_variables_for_another_process_are_ignored(monkeypatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    with bound(port=0) as (sock,):
        assert sock.getsockname()[0] == "127.0.0.1"
    assert os.environ["LISTEN_FDS"] == "1"  # not ours: left alone


def test_systemd_variables_without_sockets(monkeypatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert systemd_sockets(10) is None
    assert "LISTEN_PID" not in os.environ
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "many")
    with pytest.raises(OSError, match="LISTEN_FDS must be a number of sockets, not 'many'"):
        systemd_sockets(10)
    assert "LISTEN_FDS" not in os.environ


def test_systemd_fd_that_is_no_socket(monkeypatch) -> None:
    start = 200  # two free descriptors standing in for 3 and 4
    for fd in (start, start + 1):
        with pytest.raises(OSError):
            os.fstat(fd)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.dup2(sock.fileno(), start)
    read, write = os.pipe()
    os.dup2(read, start + 1)
    os.close(read)
    os.close(write)
    monkeypatch.setattr(sockets, "SD_LISTEN_FDS_START", start)
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    try:
        with pytest.raises(OSError, match=f"file descriptor {start + 1}: Socket operation on"):
            systemd_sockets(10)
        with pytest.raises(OSError):  # the socket adopted before the error was closed again
            os.fstat(start)
    finally:
        os.close(start + 1)  # not a socket: left as it was
