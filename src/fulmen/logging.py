"""Log formatting and the default logging configuration.

Loggers: `fulmen.error` (server events, app tracebacks) and `fulmen.access` (one line per
request), both under `fulmen`. Levels are coloured when the stream is a TTY. Lines are text or,
with `--log-format json`, one JSON object each; `--log-config` applies the user's configuration
on top of fulmen's; `--access-log-format` chooses the fields of access lines (`AccessFormat`).
"""

from __future__ import annotations

import configparser
import copy
import datetime
import json
import logging
import logging.config
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Literal

import click

from fulmen.protocols.wire import escape

if TYPE_CHECKING:
    from fulmen.config import Config

TRACE_LEVEL = 5
logging.addLevelName(TRACE_LEVEL, "TRACE")

LOG_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE_LEVEL,
}

_LEVEL_COLOURS = {
    TRACE_LEVEL: "blue",
    logging.DEBUG: "cyan",
    logging.INFO: "green",
    logging.WARNING: "yellow",
    logging.ERROR: "red",
    logging.CRITICAL: "bright_red",
}


class ColourFormatter(logging.Formatter):
    """Adds `%(levelprefix)s`: the level name padded to align messages, coloured on a TTY."""

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        style: Literal["%", "{", "$"] = "%",
        use_colors: bool | None = None,
    ) -> None:
        self.use_colors = sys.stderr.isatty() if use_colors is None else use_colors
        super().__init__(fmt=fmt, datefmt=datefmt, style=style)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record = copy.copy(record)
        name = record.levelname
        pad = " " * max(0, 8 - len(name))
        if self.use_colors:
            name = click.style(name, fg=_LEVEL_COLOURS.get(record.levelno))
        record.__dict__["levelprefix"] = f"{name}:{pad}"
        return super().formatMessage(record)


class AccessFormatter(ColourFormatter):
    """Colours the status code of access lines by class (2xx green, 3xx yellow, 4xx red)."""

    _STATUS_COLOURS = {1: "bright_white", 2: "green", 3: "yellow", 4: "red", 5: "bright_red"}

    def formatMessage(self, record: logging.LogRecord) -> str:
        status = getattr(record, "status_code", None)
        text = f" {status}"
        if self.use_colors and isinstance(status, int) and record.message.endswith(text):
            record = copy.copy(record)
            colour = self._STATUS_COLOURS.get(status // 100)
            record.message = (
                record.message[: -len(text)] + " " + click.style(str(status), fg=colour)
            )
        return super().formatMessage(record)


LOGGING_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "default": {
            "()": "fulmen.logging.ColourFormatter",
            "fmt": "%(levelprefix)s %(message)s",
        },
        "access": {
            "()": "fulmen.logging.AccessFormatter",
            "fmt": "%(levelprefix)s %(message)s",
        },
    },
    "handlers": {
        "default": {
            "formatter": "default",
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
        },
        "access": {
            "formatter": "access",
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
        },
    },
    "loggers": {
        "fulmen": {"handlers": ["default"], "level": "INFO", "propagate": False},
        "fulmen.error": {"level": "INFO"},
        "fulmen.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
    },
}


def configure_logging(
    log_level: str,
    access_log: bool,
    use_colors: bool | None,
    log_config: Any = None,
    log_format: str = "text",
) -> None:
    """Install the default configuration at `log_level`, then the user's `log_config` (which
    may override fulmen's loggers); silence access lines if disabled. A `log_config` that
    cannot be applied raises `LogConfigError`, with fulmen's own configuration in place."""
    config = copy.deepcopy(LOGGING_CONFIG)
    if log_format == "json":
        for formatter in config["formatters"].values():
            formatter.clear()
            formatter["()"] = "fulmen.logging.JsonFormatter"
    elif use_colors is not None:
        for formatter in config["formatters"].values():
            formatter["use_colors"] = use_colors
    logging.config.dictConfig(config)
    level = LOG_LEVELS[log_level]
    for name in ("fulmen", "fulmen.error", "fulmen.access"):
        logging.getLogger(name).setLevel(level)
    if log_config is not None:
        apply_log_config(log_config)
    if not access_log:
        access = logging.getLogger("fulmen.access")
        access.handlers = []
        access.propagate = False
        access.setLevel(logging.CRITICAL + 1)


# The user's logging configuration (--log-config)


class LogConfigError(ValueError):
    """A `--log-config` that cannot be read or applied."""


def apply_log_config(log_config: Any) -> None:
    """Apply a dictConfig dict, a fileConfig parser or file object, or a file by its suffix:
    `.json`, `.yaml`, `.yml` are dictConfig, anything else (`.ini`, `.conf`) fileConfig."""
    if isinstance(log_config, dict):
        _apply("the log_config dict", logging.config.dictConfig, log_config)
    elif isinstance(log_config, configparser.RawConfigParser) or hasattr(log_config, "readline"):
        _apply("the log_config object", _file_config, log_config)
    elif isinstance(log_config, (str, os.PathLike)):
        path = os.fspath(log_config)
        suffix = os.path.splitext(path)[1].lower()
        what = f"log config file {path!r}"
        if suffix in (".json", ".yaml", ".yml"):
            _apply(what, logging.config.dictConfig, _load_dict(path, suffix, what))
        else:
            if not os.path.isfile(path):  # fileConfig would say only "KeyError: 'formatters'"
                raise LogConfigError(f"Cannot apply {what}: no such file")
            _apply(what, _file_config, path)
    else:
        raise LogConfigError(
            "log_config must be a file path, a dict, a configparser.RawConfigParser or a file "
            f"object, not {type(log_config).__name__}"
        )


def _file_config(source: Any) -> None:
    # As uvicorn: loggers the file does not name (fulmen's among them) keep working.
    logging.config.fileConfig(source, disable_existing_loggers=False)


def _load_dict(path: str, suffix: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            if suffix == ".json":
                return json.load(file)
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                raise LogConfigError(
                    f"Cannot apply {what}: YAML needs PyYAML (pip install pyyaml)"
                ) from None
            return yaml.safe_load(file)
    except LogConfigError:
        raise
    except Exception as exc:  # OSError, JSON or YAML syntax: one clear line
        raise LogConfigError(f"Cannot apply {what}: {exc}") from exc


def _apply(what: str, function: Any, source: Any) -> None:
    try:
        function(source)
    except Exception as exc:
        raise LogConfigError(f"Cannot apply {what}: {type(exc).__name__}: {exc}") from exc


# JSON lines (--log-format json)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message; an access record's fields;
    `exception` (a traceback) as a string. Everything is JSON-encoded with ASCII escapes, so a
    newline or U+2028 in request data cannot start a line of its own."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def _iso(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created).astimezone()
    return moment.isoformat(timespec="milliseconds")


# Access line formats (--access-log-format)

# The default line, as atoms: `127.0.0.1:51234 - "GET /path?q=1 HTTP/1.1" 200`.
DEFAULT_ACCESS_FORMAT = '%(client)s - "%(method)s %(target)s %(protocol)s" %(status)d'
_ATOM = re.compile(r"%\(([^)]*)\)")
_HEADER_ATOM = re.compile(r"\{([!#$%&'*+.^_`|~0-9A-Za-z-]+)\}([io])")
# Each atom with a sample value, to check the format's conversions once, at startup.
ATOMS: dict[str, Any] = {
    "client": "127.0.0.1:51234",
    "method": "GET",
    "path": "/",
    "query": "",
    "target": "/",
    "protocol": "HTTP/1.1",
    "scheme": "http",
    "status": 200,
    "bytes": 0,
    "duration_ms": 0.0,
    "timestamp": "2000-01-01T00:00:00.000+00:00",
}
_TIMED = frozenset(("bytes", "duration_ms"))
STATS_KEY = "fulmen.access"  # scope key of [start time, body bytes] when the format uses them


class AccessFormat:
    """A parsed `--access-log-format`: which atoms it uses, computed only those per line."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.atoms: list[str] = []
        self.request_headers: list[tuple[str, bytes]] = []
        self.response_headers: list[tuple[str, bytes]] = []
        for key in dict.fromkeys(_ATOM.findall(fmt)):
            header = _HEADER_ATOM.fullmatch(key)
            if header is not None:
                target = self.request_headers if header[2] == "i" else self.response_headers
                target.append((key, header[1].lower().encode("ascii")))
            elif key in ATOMS:
                self.atoms.append(key)
            else:
                raise ValueError(
                    f"access_log_format: unknown atom %({key}); use {', '.join(ATOMS)}, "
                    "{header-name}i or {header-name}o"
                )
        sample = {key: ATOMS[key] for key in self.atoms}
        sample.update((key, "-") for key, _ in self.request_headers + self.response_headers)
        try:
            fmt % sample
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"access_log_format {fmt!r} is not a valid format: {exc}") from None
        self.timed = not _TIMED.isdisjoint(self.atoms)

    def log(self, scope: dict[str, Any], status: int, headers: Any) -> None:
        """Log one access line for a request `scope` answered with `status` and `headers`."""
        fields = self.fields(scope, status, headers)
        text = {k: escape(v) if isinstance(v, str) else v for k, v in fields.items()}
        access_logger.info(self.fmt, text, extra={"status_code": status, "access": fields})

    def fields(self, scope: dict[str, Any], status: int, headers: Any) -> dict[str, Any]:
        """The raw (unescaped) value of each atom the format uses."""
        fields: dict[str, Any] = {}
        for atom in self.atoms:
            fields[atom] = _COMPUTE[atom](scope, status)
        for key, name in self.request_headers:
            fields[key] = _header(scope["headers"], name)
        for key, name in self.response_headers:
            fields[key] = _header(headers, name)
        return fields


access_logger = logging.getLogger("fulmen.access")


def _header(headers: Any, name: bytes) -> str:
    values = [bytes(value) for key, value in headers if bytes(key).lower() == name]
    return b", ".join(values).decode("latin-1") if values else "-"


def _client(scope: dict[str, Any], status: int) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _query(scope: dict[str, Any]) -> str:
    return bytes(scope.get("query_string", b"")).decode("latin-1")


def _target(scope: dict[str, Any], status: int) -> str:
    query = _query(scope)
    return f"{scope['path']}?{query}" if query else str(scope["path"])


def _stat(scope: dict[str, Any], index: int) -> Any:
    stats = scope.get(STATS_KEY)
    if stats is None:
        return 0
    return stats[1] if index else (time.perf_counter() - stats[0]) * 1000.0


_COMPUTE: dict[str, Any] = {
    "client": _client,
    "method": lambda scope, status: scope.get("method", "GET"),  # a WebSocket scope has none
    "path": lambda scope, status: scope["path"],
    "query": lambda scope, status: _query(scope),
    "target": _target,
    "protocol": lambda scope, status: f"HTTP/{scope['http_version']}",
    "scheme": lambda scope, status: scope["scheme"],
    "status": lambda scope, status: status,
    "bytes": lambda scope, status: _stat(scope, 1),
    "duration_ms": lambda scope, status: _stat(scope, 0),
    "timestamp": lambda scope, status: _iso(time.time()),
}


def timed_app(app: Any) -> Any:
    """Wrap `app` to record, in its scope, when it started and the body bytes it sent: for the
    `bytes` and `duration_ms` atoms only. The counts are taken before each message is passed
    on, because the access line is written inside the last `send`."""

    async def timed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        stats = scope[STATS_KEY] = [time.perf_counter(), 0]

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                stats[1] += len(message.get("body", b""))
            await send(message)

        await app(scope, receive, counting_send)

    return timed


def configure_with(config: Config) -> None:
    """`configure_logging` with a `Config`'s options (raises `LogConfigError`)."""
    configure_logging(
        config.log_level, config.access_log, config.use_colors, config.log_config, config.log_format
    )


def configure_from(config: Config) -> bool:
    """`configure_with`, for a supervisor: False (after logging why, through fulmen's own
    configuration) if the `log_config` cannot be applied."""
    try:
        configure_with(config)
    except LogConfigError as exc:
        logging.getLogger("fulmen.error").error("%s", exc)
        return False
    return True
