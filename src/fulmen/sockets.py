"""Binding the listening sockets: TCP, Unix domain sockets, inherited fds, systemd activation.

Which sockets a server listens on, the first rule that applies:

1. systemd socket activation: `LISTEN_PID` is this process and `LISTEN_FDS` counts the sockets
   passed from file descriptor 3 onward (sd_listen_fds(3));
2. `--bind`, repeatable: `HOST:PORT`, `[IPV6]:PORT`, `unix:PATH`, `fd://N`;
3. `--fd`, then `--uds`, then `--host`/`--port`.

Everything here runs before the event loop serves. The address forms are parsed (and checked
for `Config`) in `fulmen.addresses`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from typing import TYPE_CHECKING

from fulmen.addresses import addresses

if TYPE_CHECKING:
    from fulmen.config import Config

# sd_listen_fds(3): passed sockets start after stdin, stdout and stderr.
SD_LISTEN_FDS_START = 3
_SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def bind_sockets(config: Config) -> list[socket.socket]:
    """Every listening socket `config` asks for, bound and listening (the supervisor of worker
    processes binds them once and hands them to each worker). On an error none stays open."""
    inherited = systemd_sockets(config.backlog)
    if inherited is not None:
        return inherited
    wanted = addresses(config)
    # Dual stack: an IPv6 socket also accepts IPv4 (as ::ffff:a.b.c.d), unless an IPv4 address
    # on the same port is asked for too, which would then be taken already.
    ipv4_ports = {a.port for a in wanted if a.kind == "tcp" and ":" not in a.host and a.port}
    socks: list[socket.socket] = []
    try:
        for address in wanted:
            if address.kind == "fd":
                socks.append(from_fd(address.fd, config.backlog))
            elif address.kind == "unix":
                socks.append(bind_unix(address.path, config.backlog))
            else:
                dual = address.port not in ipv4_ports
                host, port = address.host, address.port
                socks.append(bind_tcp(host, port, config.backlog, config.reuse_port, dual))
    except BaseException:
        remove_socket_files(socket_files(config, socks))
        for sock in socks:
            sock.close()
        raise
    return socks


def bind_tcp(
    host: str, port: int, backlog: int, reuse_port: bool = False, dual_stack: bool = True
) -> socket.socket:
    """A listening TCP socket; an address containing ':' is IPv6.

    Dual stack (RFC 3493 §5.3, IPV6_V6ONLY off): `::` serves IPv4 too, where the system allows
    it (OpenBSD does not); the flag can only be set before binding.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            option = getattr(socket, "SO_REUSEPORT", None)
            if option is None:  # pragma: no cover - Windows
                raise OSError("reuse_port: SO_REUSEPORT is not supported on this platform")
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_udp(tcp: socket.socket, reuse_port: bool) -> socket.socket:
    """The UDP socket of HTTP/3 beside a TCP listener: the same address and port. With
    `reuse_port` (several server processes), each process binds its own; the kernel then
    keeps each client's datagrams to one of them (by address and port)."""
    address = tcp.getsockname()
    sock = socket.socket(tcp.family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if tcp.family == socket.AF_INET6:
            v6only = tcp.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_unix(path: str, backlog: int) -> socket.socket:
    """Bind a Unix socket, replacing a stale socket file (never a regular file)."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Like uvicorn: read/write for user, group and others; restrict with the directory.
        os.chmod(path, 0o666)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def from_fd(fd: int, backlog: int) -> socket.socket:
    """Adopt an already bound socket, detecting its family instead of assuming one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, f"file descriptor {fd}: {exc.strerror}") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise OSError(f"file descriptor {fd} is not a stream socket")
        sock.listen(backlog)
    except BaseException:
        sock.close()  # handed over to fulmen: closed like any socket fulmen gives up
        raise
    sock.setblocking(False)
    return sock


def systemd_sockets(backlog: int) -> list[socket.socket] | None:
    """The sockets systemd passed (socket activation), or None when there are none for us.

    As sd_listen_fds(3): only when `LISTEN_PID` is this process (the variables may have been
    inherited from a parent they were meant for); the variables are then removed, so child
    processes do not take the sockets for theirs, and the fds are made close-on-exec.
    """
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    if not count or pid != str(os.getpid()):
        return None
    for name in _SYSTEMD_VARIABLES:
        os.environ.pop(name, None)
    if not count.isdigit():
        raise OSError(f"LISTEN_FDS must be a number of sockets, not {count!r}")
    socks: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
            sock = from_fd(fd, backlog)
            sock.set_inheritable(False)
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks or None


def socket_files(config: Config, socks: list[socket.socket]) -> list[tuple[str, int]]:
    """The socket files among `socks` that fulmen created (from `--uds` or `--bind unix:`), with
    their inode; inherited sockets' files belong to whoever bound them."""
    paths = {a.path for a in addresses(config) if a.kind == "unix"}
    files = []
    for sock in socks:
        name = sock.getsockname() if sock.family == socket.AF_UNIX else None
        if isinstance(name, str) and name in paths:
            with contextlib.suppress(OSError):
                files.append((name, os.stat(name).st_ino))
    return files


def remove_socket_files(files: list[tuple[str, int]]) -> None:
    """Remove the socket files fulmen created, unless another server has replaced one since
    (a new server taking over the path in a restart must keep its socket)."""
    for path, inode in files:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)


def describe(sock: socket.socket, scheme: str = "http") -> str:
    """The URL or path a listening socket serves, for the startup log line."""
    if sock.family == socket.AF_UNIX:
        return f"{scheme} on unix socket {sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"
