"""Process supervisors: `multiprocess.Multiprocess` runs `--workers N` server processes,
`reload.ChangeReload` restarts one when a file changes. Both bind the sockets once, here."""

from __future__ import annotations

import logging
import socket

from fulmen.config import Config
from fulmen.sockets import bind_sockets, describe, socket_files
from fulmen.tls import create_ssl_context

logger = logging.getLogger("fulmen.error")


def listen_once(config: Config) -> tuple[list[socket.socket], list[tuple[str, int]]]:
    """Bind every socket for the child processes to inherit and log each once; also the socket
    files to remove at exit. The TLS options are checked here, so that a certificate that
    cannot be loaded is one error, not one per child. Raises OSError (startup failure)."""
    scheme = "http" if create_ssl_context(config) is None else "https"
    sockets = bind_sockets(config)
    for sock in sockets:
        logger.info("Fulmen running on %s (Press CTRL+C to quit)", describe(sock, scheme))
        if config.http3 and sock.family != socket.AF_UNIX:  # each child binds its UDP socket
            logger.info("HTTP/3 on %s (UDP)", describe(sock, "https"))
    return sockets, socket_files(config, sockets)
