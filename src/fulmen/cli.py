"""The `fulmen` command, generated from the option fields of `fulmen.config.Config`."""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

import click

import fulmen
from fulmen.config import OPTION_FIELDS, Config
from fulmen.configfile import ConfigFileError, read_config_file
from fulmen.main import run


class _Lines(click.types.StringParamType):
    """A string option whose environment variable holds one value per line.

    (Click splits repeatable options' variables on whitespace, which would cut 'Name: value'.)
    """

    envvar_list_splitter = "\n"


_LINES = _Lines()


def _param(f: dataclasses.Field[Any]) -> click.Option:
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else None
    kwargs: dict[str, Any] = {
        "help": meta["help"],
        "envvar": "FULMEN_" + f.name.upper(),
        "show_default": default is not None and default != "",
    }
    if meta["choices"]:
        kwargs["type"] = click.Choice(meta["choices"])
    elif meta["multiple"]:
        kwargs.update(multiple=True, type=_LINES)
    elif "/" not in flag:
        kwargs["type"] = meta["kind"] or type(default)
    if "/" in flag or (isinstance(default, bool) and meta["kind"] is not bool):
        kwargs.pop("type", None)
        kwargs["is_flag"] = True
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if f.name in ("config", "env_file"):
        kwargs["type"] = click.Path(exists=True, dir_okay=False)
    if f.name == "config":  # read first: its options become the defaults of all the others
        kwargs.update(is_eager=True, callback=_read_config)
    return click.Option([flag, f.name], default=None if meta["multiple"] else default, **kwargs)


def _read_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Make the options of the `--config` file the command's `default_map`: click takes a
    value from the command line, else from the `FULMEN_*` variable, else from that map."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        options = read_config_file(value, OPTION_FIELDS)
    except ConfigFileError as exc:
        raise click.UsageError(str(exc), ctx) from None
    ctx.default_map = {**(ctx.default_map or {}), **options}
    return value


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(
        f"Running fulmen {fulmen.__version__} with {platform.python_implementation()} "
        f"{platform.python_version()} on {platform.system()}"
    )
    ctx.exit()


def _main(app: str, **options: Any) -> None:
    try:
        Config(app, **options)  # validate first: a bad value is a usage error, not a traceback
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    run(app, **options)


main = click.Command(
    name="fulmen",
    callback=_main,
    context_settings={"auto_envvar_prefix": "FULMEN", "help_option_names": ["-h", "--help"]},
    help="Serve APP, an ASGI (or WSGI) application given as 'module:attribute'.",
    params=[
        click.Argument(["app"], envvar="FULMEN_APP"),
        *(_param(f) for f in OPTION_FIELDS),
        click.Option(
            ["--version"],
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_print_version,
            help="Show the version and exit.",
        ),
    ],
)
