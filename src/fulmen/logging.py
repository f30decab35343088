"""Log formatting and the default logging configuration.

Loggers: `fulmen.error` (server events, app tracebacks) and `fulmen.access` (one line per
request), both under `fulmen`. Levels are coloured when the stream is a TTY. Lines are text or,
with `--log-format json`, one JSON object each; `--log-config` applies the user's configuration
on top of fulmen's. The fields of access lines (`--access-log-format`) are `fulmen.access`'s.
"""

from __future__ import annotations

import configparser
import copy
import json
import logging
import logging.config
import os
import sys
from typing import TYPE_CHECKING, Any, Literal

import click

from fulmen.access import iso_time
from fulmen.protocols.wire import status_text

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
        if not self.use_colors or not isinstance(status, int):
            return super().formatMessage(record)
        text = status_text(status)
        if record.message.endswith(" " + text):
            record = copy.copy(record)
            colour = self._STATUS_COLOURS.get(status // 100)
            record.message = record.message[: -len(text)] + click.style(text, fg=colour)
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
            "timestamp": iso_time(record.created),
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
