"""Thin WebSocket framing adapters: bytes in, events out; messages in, bytes out.

The handshake, message assembly, size limit, UTF-8 check of text, queueing, pings, closing and
the ASGI side are fulmen's own, in `fulmen.protocols.websocket`, whichever engine frames the
bytes. An engine only parses and serialises frames, negotiates permessage-deflate (RFC 7692)
and answers pings and close frames as RFC 6455 §5.5 requires.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from fulmen.protocols.engines.base import (
    ABNORMAL,
    CLOSE,
    DATA,
    NO_STATUS,
    PONG,
    Engine,
    EngineFactory,
    Event,
    plain_frame,
)

__all__ = [
    "ABNORMAL",
    "CLOSE",
    "DATA",
    "NO_STATUS",
    "PONG",
    "Engine",
    "EngineFactory",
    "Event",
    "engine_factory",
    "engine_name",
    "plain_frame",
]

WEBSOCKETS_MIN = 16  # the frame layer's attributes the adapter reads have these names since 16


def _usable(library: str) -> bool:
    if importlib.util.find_spec(library) is None:
        return False
    if library == "websockets":
        major = importlib.metadata.version("websockets").split(".")[0]
        return major.isdigit() and int(major) >= WEBSOCKETS_MIN
    return True


def engine_name(name: str) -> str:
    """Resolve `--ws`: 'auto' is websockets if installed (16 or newer), else wsproto, else none.
    An engine asked for by name must be installed: ValueError otherwise."""
    if name == "websockets-sansio":
        name = "websockets"
    if name == "auto":
        for candidate in ("websockets", "wsproto"):
            if _usable(candidate):
                return candidate
        return "none"
    if name != "none" and not _usable(name):
        version = ">=16 " if name == "websockets" else ""
        raise ValueError(f"--ws {name} needs the {name} library {version}installed")
    return name


def engine_factory(name: str, max_size: int, deflate: bool) -> EngineFactory | None:
    """The factory for `--ws` (None for 'none')."""
    name = engine_name(name)
    if name == "websockets":
        from fulmen.protocols.engines.websockets import WebsocketsFactory

        return WebsocketsFactory(max_size, deflate)
    if name == "wsproto":
        from fulmen.protocols.engines.wsproto import WsprotoFactory

        return WsprotoFactory(max_size, deflate)
    return None
