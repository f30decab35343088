"""Addresses as the options spell them: `--bind`, `--host`/`--port`, `--uds`, `--fd` and
`--metrics-bind`.

Pure parsing and checking, no sockets: `Config` validates its options with these functions,
and `fulmen.sockets` binds what `addresses` returns. A leaf module: it imports nothing of
fulmen, so that `fulmen.config` can import it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

_BIND_FORMS = "HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N"


class Address(NamedTuple):
    """One place to listen: `kind` is "tcp" (host, port), "unix" (path) or "fd" (fd)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1


class BindOptions(Protocol):
    """The options that say where to listen (a `fulmen.config.Config` has them)."""

    @property
    def bind(self) -> list[str]: ...

    @property
    def fd(self) -> int | None: ...

    @property
    def uds(self) -> str | None: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def parse_bind(value: str) -> Address:
    """One `--bind` value; a ValueError names the accepted forms."""
    if value.startswith("unix:"):
        if len(value) == 5:
            raise ValueError("--bind unix:PATH needs a path")
        return Address("unix", path=value[5:])
    if value.startswith("fd://"):
        number = value[5:]
        if not number.isdigit():
            raise ValueError(f"--bind {value!r}: fd://N needs a file descriptor number")
        return Address("fd", fd=int(number))
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--bind {value!r}: write an IPv6 address in brackets, as [::1]:8000")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--bind {value!r}: expected {_BIND_FORMS}")
    if int(port) > 65535:
        raise ValueError(f"--bind {value!r}: port must be between 0 and 65535")
    return Address("tcp", host=host, port=int(port))


def addresses(options: BindOptions) -> list[Address]:
    """The addresses `options` ask for (without systemd activation, which overrides them)."""
    if options.bind:
        return [parse_bind(value) for value in options.bind]
    if options.fd is not None:
        return [Address("fd", fd=options.fd)]
    if options.uds:
        return [Address("unix", path=options.uds)]
    host = options.host
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return [Address("tcp", host=host, port=options.port)]


def check_binding(options: BindOptions) -> None:
    """Reject malformed or repeated `--bind` values (a usage error, before anything binds)."""
    wanted = addresses(options)
    if len(set(wanted)) != len(wanted):
        raise ValueError("the same address is given twice in --bind")


def parse_address(value: str) -> tuple[str, int]:
    """`--metrics-bind`: `HOST:PORT` or `[IPV6]:PORT` (a ValueError otherwise)."""
    try:
        address = parse_bind(value)
    except ValueError:
        address = None
    if address is None or address.kind != "tcp":
        raise ValueError(f"--metrics-bind {value!r}: expected HOST:PORT or [IPV6]:PORT")
    return address.host, address.port
