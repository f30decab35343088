"""Configuration files: `--config fulmen.toml` (options) and `--env-file .env` (the app's
environment).

The IO behind two options of `fulmen.config.Config`, kept out of that module. A TOML file holds
options under the names of `Config`'s fields (`port = 8001`, `headers = ["X-A: 1"]`), plus
`app`. Values are checked against each field's kind here, so a mistake names the file and the
key rather than surfacing later as a click conversion or a crash. The fields are passed in
(`read_config_file(path, OPTION_FIELDS)`): this module does not import `config`, which
imports it.

Precedence, highest first: command line, `FULMEN_*` environment, the file, the defaults (the
click command passes the file as its `default_map`); in Python, keyword arguments win over the
file.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from fulmen.options import check_names

logger = logging.getLogger("fulmen.error")


class ConfigFileError(ValueError):
    """A configuration or env file that cannot be read or holds a bad entry."""


def _toml() -> Any:
    """The TOML parser: `tomllib` from Python 3.11, else the `tomli` package it came from."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        return importlib.import_module("tomli")
    except ImportError:
        raise ConfigFileError(
            "reading a TOML configuration file needs Python 3.11 or the 'tomli' package "
            "(pip install tomli, or 'fulmen[standard]')"
        ) from None


def read_config_file(path: str, fields: Sequence[dataclasses.Field[Any]]) -> dict[str, Any]:
    """The options in TOML file `path` (with `app` when it names one), checked against the
    option `fields` (`fulmen.config.OPTION_FIELDS`)."""
    toml = _toml()
    try:
        with open(path, "rb") as file:
            data: dict[str, Any] = toml.load(file)
    except OSError as exc:
        raise ConfigFileError(
            f"cannot read configuration file {path!r}: {exc.strerror or exc}"
        ) from None
    except toml.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: invalid TOML: {exc}") from None
    if "config" in data:
        raise ConfigFileError(f"{path}: 'config' cannot be set in a configuration file")
    table = {f.name: f for f in fields}
    try:
        check_names([key for key in data if key != "app"], table)
    except TypeError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    return {key: _checked_value(path, key, value, table) for key, value in data.items()}


def _checked_value(
    path: str, key: str, value: Any, table: dict[str, dataclasses.Field[Any]]
) -> Any:
    """`value` if it has the kind option `key` takes (an int is a float too)."""
    if key == "app":
        expected, ok = "a string 'module:attribute'", isinstance(value, str)
        return _or_fail(path, key, value, expected, ok)
    f = table[key]
    meta = f.metadata
    if meta["choices"]:
        ok = isinstance(value, str) and value in meta["choices"]
        return _or_fail(path, key, value, "one of " + ", ".join(meta["choices"]), ok)
    if meta["multiple"]:
        items = [value] if isinstance(value, str) else value  # one string is one value
        ok = isinstance(items, list) and all(isinstance(item, str) for item in items)
        return _or_fail(path, key, items, "a list of strings", ok)
    kind = _kind(f)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return _or_fail(path, key, value, names.get(kind, kind.__name__), ok)


def _kind(f: dataclasses.Field[Any]) -> type:
    meta = f.metadata
    if "/" in (meta["flag"] or ""):
        return bool  # an on/off flag whose default may be None (use_colors)
    kind: type = meta["kind"] or type(f.default)
    return kind


def _or_fail(path: str, key: str, value: Any, expected: str, ok: bool) -> Any:
    if not ok:
        raise ConfigFileError(f"{path}: {key} must be {expected}, not {value!r}")
    return value


def load_env_file(path: str) -> None:
    """Add the variables of dotenv file `path` to `os.environ`, as uvicorn's `--env-file`.

    A variable already in the environment keeps its value (python-dotenv's `override=False`).
    `FULMEN_*` variables from the file reach the application only: the options were read before.
    """
    try:
        import dotenv
    except ImportError:
        raise ConfigFileError(
            "--env-file needs the 'python-dotenv' package "
            "(pip install python-dotenv, or 'fulmen[standard]')"
        ) from None
    if not os.path.isfile(path):
        raise ConfigFileError(f"env file {path!r} does not exist or is not a file")
    ignored = []
    for key, value in dotenv.dotenv_values(path).items():
        if value is None or key in os.environ:
            continue
        os.environ[key] = value
        if key.startswith("FULMEN_"):
            ignored.append(key)
    if ignored:
        logger.warning(
            "%s sets %s for the application only: fulmen's own options come from the command "
            "line, the environment it was started with or --config.",
            path,
            ", ".join(ignored),
        )
