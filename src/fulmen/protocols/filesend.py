"""A response body the server takes from a file: the ASGI `http.response.pathsend` (a path)
and `http.response.zerocopysend` (an open file, an offset and a count) extensions, the same
for every protocol.

How the bytes go is up to the framer (`file_socket`):
- HTTP/1.1 over plain TCP (or a Unix socket) with the length known: `os.sendfile` from the
  file straight into the socket, no byte passing through Python. When the socket is full,
  the server waits for it to take more (its flow control, and `--timeout-send` watching the
  bytes left shrink), as for any response.
- Otherwise (TLS, chunked framing, HTTP/2): the file is read in `FILE_CHUNK` pieces, each
  sent once the protocol's flow control allows (the socket's buffer, HTTP/2's windows), so
  a connection holds at most one piece whatever the file's size.

Files are opened and read on the event loop's thread, as nginx does without thread pools:
from the page cache this costs microseconds. A file that is shorter than announced (it
shrank, or the app's Content-Length is wrong) is an error: the response is cut (the
connection closes, or the HTTP/2 stream is reset) and the app's `send` raises, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from fulmen.protocols.flow import Flow, FlowControl

FILE_CHUNK = 256 * 1024  # bytes read and sent at a time where the file cannot go zero-copy
# What `os.sendfile` may queue in the socket beyond what TCP can send at once (TCP_NOTSENT_LOWAT):
# the rest goes as the client takes it, each time the socket is writable again. Queuing a whole
# file instead leaves its transmission to the ACKs, processed wherever they arrive (on
# loopback, in the client's own CPU time): 128 KiB tripled a local client's download rate, and
# it bounds kernel memory per download. It limits unsent bytes only, not bytes in flight.
UNSENT_LOWAT = 128 * 1024
_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", None)  # Linux, macOS
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
ZERO_COPY = hasattr(os, "sendfile")  # os.sendfile into a socket (not on Windows)
PATHSEND = "http.response.pathsend"
ZEROCOPYSEND = "http.response.zerocopysend"
FILE_MESSAGES = frozenset((PATHSEND, ZEROCOPYSEND))


class FileFramer(Protocol):
    """What of a protocol's framer (`fulmen.protocols.cycle.Framer`) a file body uses."""

    @property
    def flow(self) -> Flow: ...

    def send_body(self, body: bytes, more_body: bool) -> None: ...

    def file_socket(self, count: int) -> FlowControl | None: ...


class FileBody:
    """The file of one pathsend or zerocopysend message: which bytes to send, and whether the
    body goes on after them. Used as a context manager: a file opened from a path is closed
    after it (an app's own file stays open, its position moved past what was sent, as
    `os.sendfile` without an offset does)."""

    __slots__ = ("count", "fd", "more_body", "offset", "opened", "seek")

    def __init__(self, message: Mapping[str, Any]) -> None:
        self.opened = message["type"] == PATHSEND
        self.more_body = False
        self.seek = False
        if self.opened:
            # Non-blocking: opening a FIFO would otherwise wait for a writer, and the loop
            # with it (a regular file ignores the flag).
            self.fd = os.open(message["path"], _OPEN_FLAGS)
            info = os.fstat(self.fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(self.fd)
                raise RuntimeError(f"pathsend: {message['path']!r} is not a regular file")
            self.offset = 0
            self.count = info.st_size
            return
        file = message["file"]
        self.fd = file if isinstance(file, int) else file.fileno()
        offset = message.get("offset")
        if offset is None:
            offset = os.lseek(self.fd, 0, os.SEEK_CUR)
            self.seek = True
        self.offset = offset
        count = message.get("count")
        self.count = os.fstat(self.fd).st_size - offset if count is None else count
        self.more_body = bool(message.get("more_body", False))

    def __enter__(self) -> FileBody:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.opened:
            os.close(self.fd)

    async def send(self, framer: FileFramer, more: bool, gone: Callable[[], bool]) -> bool:
        """Send the bytes, then end the body unless `more` follows. `gone()`: the client has
        left, the rest is not sent. Whether all of it went."""
        count = self.count
        flow = framer.file_socket(count) if count else None
        if flow is not None:
            sent = await sendfile(flow, self.fd, self.offset, count)
            if sent == count:
                framer.send_body(b"", more)  # ends the body
        elif count:
            sent = await self._stream(framer, more, gone)
        else:
            sent = 0
            framer.send_body(b"", more)
        if self.seek:
            os.lseek(self.fd, self.offset + sent, os.SEEK_SET)
        return sent == count

    async def _stream(self, framer: FileFramer, more: bool, gone: Callable[[], bool]) -> int:
        """Read and send in pieces, each once the flow allows; the last ends the body unless
        `more` follows. How many bytes went."""
        flow = framer.flow
        offset = self.offset
        left = self.count
        while left:
            if flow.write_paused:
                await flow.drain()
            if gone():
                break
            chunk = os.pread(self.fd, min(FILE_CHUNK, left), offset)
            if not chunk:
                raise RuntimeError(_short(left))
            offset += len(chunk)
            left -= len(chunk)
            framer.send_body(chunk, more or left > 0)
        return offset - self.offset


async def sendfile(flow: FlowControl, fd: int, offset: int, count: int) -> int:
    """`count` bytes of file `fd` from `offset` into the socket with `os.sendfile`, after what
    its transport holds; how many went (fewer if the connection was lost)."""
    loop = asyncio.get_running_loop()
    transport = flow.transport
    sock = transport.get_extra_info("socket")
    out = sock.fileno()
    if _NOTSENT_LOWAT is not None and sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, UNSENT_LOWAT)
    watched = -1  # made at the first wait
    sent = 0
    try:
        while sent < count and not transport.is_closing():
            if not transport.get_write_buffer_size():
                try:
                    done = os.sendfile(out, fd, offset + sent, count - sent)
                except BlockingIOError:
                    done = -1
                except OSError:  # the client reset the connection
                    transport.abort()
                    break
                if not done:
                    raise RuntimeError(_short(count - sent))
                sent += max(done, 0)
                if sent == count:
                    break
            if watched < 0:
                watched = _watch(loop, flow, out)
            await flow.writable(loop.create_future(), count - sent)  # the socket is full
    finally:
        if watched >= 0:
            loop.remove_writer(watched)
            os.close(watched)
    return sent


def _watch(loop: asyncio.AbstractEventLoop, flow: FlowControl, out: int) -> int:
    """Have the loop call `flow.resume_writing()` whenever socket `out` takes more bytes, until
    the caller stops it; the descriptor it watches. The loop watches `out` for the transport
    already, so a duplicate is watched instead. It keeps the socket open: the caller closes it
    as soon as the connection is lost (which wakes `flow.writable`)."""
    watched = os.dup(out)
    loop.add_writer(watched, flow.resume_writing)
    return watched


def with_length(headers: Iterable[Any], count: int) -> Iterable[Any]:
    """`headers` with a Content-Length of `count`, unless the app gave one."""
    headers = list(headers)
    for name, _ in headers:
        if name.lower() == b"content-length":
            return headers
    headers.append((b"content-length", b"%d" % count))
    return headers


def _short(left: int) -> str:
    return f"The file ended {left} bytes short of the response's length (did it shrink?)"
