"""Log formatting and the default logging configuration.

Loggers: `fulmen.error` (server events, app tracebacks) and `fulmen.access` (one line per
request), both under `fulmen`. Levels are coloured when the stream is a TTY.
"""

from __future__ import annotations

import copy
import logging
import logging.config
import sys
from typing import Any, Literal

import click

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


def configure_logging(log_level: str, access_log: bool, use_colors: bool | None) -> None:
    """Install the default configuration at `log_level`; silence access lines if disabled."""
    config = copy.deepcopy(LOGGING_CONFIG)
    if use_colors is not None:
        for formatter in config["formatters"].values():
            formatter["use_colors"] = use_colors
    logging.config.dictConfig(config)
    level = LOG_LEVELS[log_level]
    for name in ("fulmen", "fulmen.error", "fulmen.access"):
        logging.getLogger(name).setLevel(level)
    if not access_log:
        access = logging.getLogger("fulmen.access")
        access.handlers = []
        access.propagate = False
        access.setLevel(logging.CRITICAL + 1)
