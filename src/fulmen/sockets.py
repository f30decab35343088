"""Binding the listening socket: TCP host/port, a Unix domain socket, or an inherited fd."""

from __future__ import annotations

import os
import socket
import stat

from fulmen.config import Config


def bind_sockets(config: Config) -> list[socket.socket]:
    """Every listening socket `config` asks for, bound and listening (the supervisor of worker
    processes binds them once and hands them to each worker)."""
    return [bind_socket(config)]


def bind_socket(config: Config) -> socket.socket:
    """Create, bind and listen on the socket `config` names (fd, then uds, then host:port)."""
    if config.fd is not None:
        return from_fd(config.fd, config.backlog)
    if config.uds:
        return bind_unix(config.uds, config.backlog)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError:
        sock.close()
        raise
    sock.listen(config.backlog)
    sock.setblocking(False)
    return sock


def bind_unix(path: str, backlog: int) -> socket.socket:
    """Bind a Unix socket, replacing a stale socket file (never a regular file)."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    # Like uvicorn: read/write for user, group and others; restrict with the directory.
    os.chmod(path, 0o666)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def from_fd(fd: int, backlog: int) -> socket.socket:
    """Adopt an already bound socket, detecting its family instead of assuming one."""
    sock = socket.socket(fileno=fd)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def describe(sock: socket.socket, scheme: str = "http") -> str:
    """The URL or path a listening socket serves, for the startup log line."""
    if sock.family == socket.AF_UNIX:
        return f"{scheme} on unix socket {sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"
