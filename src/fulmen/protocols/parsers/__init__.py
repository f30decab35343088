"""Thin HTTP/1.1 request parser adapters: bytes in, calls on a `ParserCallbacks` out.

Each adapter only turns bytes into `on_request` / `on_body` / `on_message_complete` calls and
raises `ParseError` for malformed input. Everything HTTP means (keep-alive, Host, framing rules,
limits shared by both) is decided once, in `fulmen.protocols.http1`.
"""

from __future__ import annotations

import importlib.util

from fulmen.protocols.parsers.base import (
    PARKED,
    Limits,
    ParseError,
    Parser,
    ParserCallbacks,
    ParserFactory,
    SpareParsers,
    check_transfer_coding,
)

__all__ = [
    "PARKED",
    "Limits",
    "ParseError",
    "Parser",
    "ParserCallbacks",
    "ParserFactory",
    "SpareParsers",
    "check_transfer_coding",
    "parser_class",
]


def parser_class(name: str) -> ParserFactory:
    """The adapter for `--http`: 'auto' prefers httptools when it is installed."""
    if name == "auto":
        name = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if name == "httptools":
        from fulmen.protocols.parsers.httptools import HttptoolsParser

        return HttptoolsParser
    from fulmen.protocols.parsers.h11 import H11Parser

    return H11Parser
