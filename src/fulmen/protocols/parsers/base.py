"""What the HTTP/1.1 parser adapters and their caller share: the `Parser` interface, the
callbacks it makes, its size `Limits`, `ParseError` and the Transfer-Encoding rule.

A leaf: the adapters (`h11`, `httptools`, `bodies`) import it, and so does the package, which
picks an adapter (`parser_class`) and re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ParseError(Exception):
    """The request cannot be served; answer `status` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ParserCallbacks(Protocol):
    def on_request(
        self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]]
    ) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_message_complete(self) -> None: ...


def check_transfer_coding(coding: bytes, has_length: bool) -> None:
    """Raise the `ParseError` a request's Transfer-Encoding (all its fields joined) deserves.

    Shared by both adapters' callers, so the status does not depend on which parser noticed:
    RFC 9112 §6.1: never with Content-Length (400); §6.3 and §7: `chunked` must be the final
    coding and applied only once (400: the framing is ambiguous); a coding before it that the
    server does not implement (any: fulmen decodes none) is 501. Empty list elements are
    ignored (RFC 9110 §5.6.1), but not after `chunked`: to a recipient that did not ignore it,
    `chunked` would not be final (llhttp refuses it too).
    """
    if has_length:
        raise ParseError(400, "Content-Length with Transfer-Encoding")
    items = [item.strip(b" \t") for item in coding.lower().split(b",")]
    codings = [item for item in items if item]
    if items[-1] != b"chunked" or codings.count(b"chunked") > 1:
        # §6.3: without a final `chunked` the body length cannot be known: 400 is a MUST.
        raise ParseError(400, "Invalid Transfer-Encoding")
    if len(codings) > 1:
        raise ParseError(501, "Unsupported transfer coding")


@dataclass(frozen=True)
class Limits:
    """Size limits shared by both parsers."""

    request_line: int = 8192
    head: int = 16384


class Parser(Protocol):
    """What the connection needs from a parser adapter."""

    upgraded: bool  # the request asked to switch protocols: no more HTTP is parsed
    trailing: bytes  # once upgraded, the bytes received after the request

    def feed(self, data: bytes) -> None: ...

    def release(self) -> bool:
        """If between requests, with no byte of the next one received (the parser then holds
        nothing a new one would not), let go of the connection (its callbacks) and of the last
        request, and return True: the parser may serve another connection (`SpareParsers`)."""

    def attach(self, callbacks: ParserCallbacks) -> None:
        """Serve another connection: a spare parser, detached at rest."""

    def close(self) -> None:
        """The parser is done with (its connection is gone, or it is a spare too many): drop
        the references back to the connection, if not released, and any cycle, so that both
        are freed at once rather than by the cyclic garbage collector. No feed follows."""


class ParserFactory(Protocol):
    def __call__(self, callbacks: ParserCallbacks, limits: Limits) -> Parser: ...


class Parked:
    """Stands for the parser of a connection between requests: an idle keep-alive connection
    holds none (a parser, with llhttp's state and the last request's head, is over 1 KiB), and
    takes one from `SpareParsers` when bytes come, before it feeds any. One instance serves
    every connection."""

    __slots__ = ()
    upgraded = False
    trailing = b""

    def feed(self, data: bytes) -> None:
        raise RuntimeError("A parked parser is replaced before it is fed")

    def release(self) -> bool:
        return False  # nothing to give back

    def attach(self, callbacks: ParserCallbacks) -> None:
        pass  # never given out: not at rest

    def close(self) -> None:
        pass


PARKED = Parked()
# Spare parsers kept for the next requests: enough for the requests that start at once on a
# loaded server, few enough that idle connections cost little (a parser is about 1 KiB).
MAX_SPARE = 256


class SpareParsers:
    """Parsers at rest, passed from connection to connection: a connection gives its parser
    back when a response is complete and nothing more came (while there is room), and takes one
    when bytes come; the server tick frees the parser of any connection found idle. So a server
    holds about as many parsers as it has requests starting, never makes one per request, and an
    idle connection holds none after a second."""

    __slots__ = ("factory", "limits", "spare")

    def __init__(self, factory: ParserFactory, limits: Limits) -> None:
        self.factory = factory
        self.limits = limits
        self.spare: list[Parser] = []

    def take(self, callbacks: ParserCallbacks) -> Parser:
        spare = self.spare
        if spare:
            parser = spare.pop()
            parser.attach(callbacks)
            return parser
        return self.factory(callbacks, self.limits)

    def give(self, parser: Parser) -> bool:
        """Keep `parser` as a spare if there is room and it is at rest (it is then released:
        True); else its connection keeps it, rather than make a new one for its next request."""
        spare = self.spare
        if len(spare) < MAX_SPARE and parser.release():
            spare.append(parser)
            return True
        return False

    def drop(self, parser: Parser) -> bool:
        """For a connection found idle by the tick: `parser`, if at rest, is released and kept
        as a spare, or freed when there are enough (True)."""
        if not parser.release():
            return False
        if len(self.spare) < MAX_SPARE:
            self.spare.append(parser)
        else:
            parser.close()
        return True
