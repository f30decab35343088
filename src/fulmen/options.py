"""How an option of `fulmen.config.Config` is declared (`option`), and option names checked
against the known ones (`check_names`).

A leaf module: `fulmen.config` declares its fields with it and checks keyword arguments with it;
`fulmen.configfile` checks the keys of a configuration file with it, without importing `config`.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from dataclasses import field
from typing import Any


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    multiple: bool = False,
    metavar: str | None = None,
    kind: type | None = None,
) -> Any:
    """Declare one option: its default, help text and how the CLI spells it."""
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "multiple": multiple,
        "metavar": metavar,
        "kind": kind,
    }
    if multiple:
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def check_names(names: Iterable[str], known: Collection[str]) -> None:
    """Reject (TypeError) a name not in `known`, suggesting the nearest known one."""
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TypeError(f"unknown fulmen option {name!r}{hint}")
