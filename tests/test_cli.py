"""The `fulmen` command: options generated from the config table, env variables, errors."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import fulmen
from fulmen import cli
from fulmen.config import OPTION_FIELDS, Config
from tests.conftest import TIMEOUT
from tests.helpers import Fulmen, clean_env, run_fulmen


def flags(f: dataclasses.Field) -> list[str]:
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    return flag.split("/")


def test_help_lists_every_option() -> None:
    result = run_fulmen("--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "APP" in result.stdout
    listed = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", result.stdout))
    expected = {flag for f in OPTION_FIELDS for flag in flags(f)} | {"--version", "--help"}
    assert listed == expected


def test_version() -> None:
    result = run_fulmen("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Running fulmen {fulmen.__version__} with ")


def test_console_script() -> None:
    script = Path(sys.executable).with_name("fulmen")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=20, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: fulmen [OPTIONS] APP")


def env_sample(f: dataclasses.Field) -> tuple[str, object]:
    """A FULMEN_<NAME> value for option `f`, and the value the command should parse from it."""
    meta = f.metadata
    if meta["choices"]:
        return meta["choices"][-1], meta["choices"][-1]
    if f.name in ("config", "env_file"):  # a file that exists (empty: no option, no variable)
        path = str(Path(__file__).with_name("configfile_empty"))
        return path, path
    if f.name == "metrics_bind":
        return "127.0.0.1:9100", "127.0.0.1:9100"
    if f.name == "bind":  # addresses, one per line
        return "127.0.0.1:8001\nunix:/tmp/a b.sock", ("127.0.0.1:8001", "unix:/tmp/a b.sock")
    if meta["multiple"]:
        return "X-A: 1\nX-B: two words", ("X-A: 1", "X-B: two words")  # one value per line
    if "/" in (meta["flag"] or "") or isinstance(f.default, bool):
        value = not f.default
        return str(value).lower(), value
    kind = meta["kind"] or type(f.default)
    if kind is int:
        return "7", 7
    if kind is float:
        return "2.5", 2.5
    return "sample", "sample"


@pytest.fixture
def invoke(monkeypatch):
    """Run the click command in-process; `fulmen.run` is replaced by a recorder."""
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(cli, "run", lambda app, **options: calls.append((app, options)))

    def invoke(args: list[str], env: dict[str, str] | None = None) -> tuple[str, dict]:
        result = CliRunner().invoke(cli.main, args, env=env)
        assert result.exit_code == 0, result.output
        assert len(calls) == 1
        return calls.pop()

    return invoke


@pytest.mark.parametrize("field", OPTION_FIELDS, ids=lambda f: f.name)
def test_every_option_settable_from_environment(field, invoke) -> None:
    raw, expected = env_sample(field)
    _, default_options = invoke(["tests.apps:app"])
    assert default_options[field.name] != expected
    app, options = invoke(["tests.apps:app"], env={f"FULMEN_{field.name.upper()}": raw})
    assert app == "tests.apps:app"
    assert options[field.name] == expected
    # Only that option changed.
    changed = {name for name in options if options[name] != default_options[name]}
    assert changed == {field.name}


def test_command_defaults_are_the_config_defaults(invoke, monkeypatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    app, options = invoke(["tests.apps:app"])
    from_cli = Config(app, **options)
    plain = Config(app)
    for f in OPTION_FIELDS:
        value = getattr(from_cli, f.name)
        assert (list(value) if f.metadata["multiple"] else value) == getattr(plain, f.name)


def test_header_option_is_repeatable(invoke) -> None:
    _, options = invoke(["tests.apps:app", "--header", "X-A: 1", "--header", "X-B: 2"])
    assert options["headers"] == ("X-A: 1", "X-B: 2")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "65536"], "port must be between 0 and 65535, not 65536"),
        (["--header", "no-colon"], "--header must be 'Name: value', not 'no-colon'"),
        (["--loop", "nope"], "Invalid value for '--loop'"),
        (["--port", "eighty"], "Invalid value for '--port'"),
    ],
)
def test_invalid_value_is_a_usage_error(args, message) -> None:
    result = run_fulmen("tests.apps:app", *args)
    assert result.returncode == 2
    assert f"Error: {message}" in result.stderr
    assert "Traceback" not in result.stderr


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=TIMEOUT)


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(["--header", "X-A: 1", "--header", "X-B: two words"], id="cli"),
        pytest.param({"FULMEN_HEADERS": "X-A: 1\nX-B: two words"}, id="env"),
    ],
)
def test_default_headers_from_cli_and_environment(how) -> None:
    args = how if isinstance(how, list) else []
    env = clean_env(**how) if isinstance(how, dict) else None
    with Fulmen("tests.apps:app", "--port", "0", "--lifespan", "off", *args, env=env) as server:
        response = get(server.url + "/")
    assert response.headers["x-a"] == "1"
    assert response.headers["x-b"] == "two words"


def test_options_from_environment_serve() -> None:
    env = clean_env(
        FULMEN_APP="tests.apps:app",
        FULMEN_PORT="0",
        FULMEN_LIFESPAN="off",
        FULMEN_ACCESS_LOG="false",
        FULMEN_SERVER_HEADER="false",
        FULMEN_ROOT_PATH="/mount",
    )
    with Fulmen(env=env) as server:
        response = get(server.url + "/page")
        server.signal()
        assert server.wait() == 0
    assert response.text == "/mount/page"
    assert "server" not in response.headers
    assert server.stdout.lines == []  # no access log
    assert "Shutting down" in server.stderr.text


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "elsewhere_app.py").write_text("from tests.apps import app\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["tests.apps:create_app", "--factory"], id="factory"),
        pytest.param(["elsewhere_app:app", "--app-dir", "{app_dir}"], id="app-dir"),
        pytest.param(["tests.apps:namespace.inner.app"], id="dotted-attribute"),
    ],
)
def test_app_loading(args, app_dir) -> None:
    args = [arg.format(app_dir=app_dir) for arg in args]
    with Fulmen(*args, "--port", "0", "--lifespan", "off") as server:
        response = get(server.url + "/hello")
    assert response.status_code == 200
    assert response.text == "/hello"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_module_xyz:app"], 'Could not import module "no_such_module_xyz".'),
        (["tests.apps:missing"], 'Attribute "missing" not found in module "tests.apps".'),
        (
            ["tests.apps:namespace.nope"],
            'Attribute "namespace.nope" not found in module "tests.apps".',
        ),
        (["tests.apps"], 'Import string "tests.apps" must be in format "<module>:<attribute>".'),
        (["tests.apps:not_callable"], "The application 'tests.apps:not_callable' is not callable."),
        (
            ["tests.apps:app", "--factory"],
            "Error calling the application factory: app() missing 3 required positional "
            "arguments: 'scope', 'receive', and 'send'",
        ),
    ],
)
def test_load_error_is_one_clear_line(args, message) -> None:
    result = run_fulmen(*args, "--port", "0")
    assert result.returncode == 1
    # Nothing but the error: no traceback, no startup lines before it.
    assert result.stderr.splitlines() == [f"ERROR:    Error loading ASGI app. {message}"]


@pytest.mark.parametrize(
    ("source", "last_line"),
    [
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        (
            "import no_such_dependency_xyz\n",
            "ModuleNotFoundError: No module named 'no_such_dependency_xyz'",
        ),
    ],
)
def test_module_error_shows_its_traceback(source, last_line, tmp_path) -> None:
    (tmp_path / "broken_app.py").write_text(source)
    result = run_fulmen("broken_app:app", "--app-dir", str(tmp_path), "--port", "0")
    assert result.returncode == 1
    assert "Traceback (most recent call last):" in result.stderr
    assert str(tmp_path / "broken_app.py") in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == last_line
