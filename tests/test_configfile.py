"""`--config fulmen.toml` and `--env-file .env` (fulmen.configfile).

Precedence: command line > `FULMEN_*` environment > config file > defaults; in Python, keyword
arguments > config file. Bad files are usage errors naming the file and the key.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from fulmen import cli
from fulmen.config import OPTION_FIELDS, Config
from fulmen.configfile import ConfigFileError, load_env_file, read_config_file
from tests.conftest import TIMEOUT
from tests.helpers import STARTED, Fulmen, Process, clean_env, run_fulmen

APP = "tests.apps:app"
ENVIRON_APP = "tests.apps_configfile:environ"


def write(tmp_path: Path, text: str, name: str = "fulmen.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def invoke(monkeypatch):
    """Run the click command in-process with `fulmen.run` replaced by a recorder."""
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(cli, "run", lambda app, **options: calls.append((app, options)))

    def invoke(args: list[str], env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
        result = CliRunner().invoke(cli.main, args, env=env)
        assert result.exit_code == 0, result.output
        return calls.pop()

    return invoke


@pytest.fixture
def scratch_env(monkeypatch):
    """Names set in `os.environ` during the test are removed again afterwards."""

    def scratch(*names: str) -> None:
        for name in names:
            monkeypatch.setenv(name, "-")  # records the original state (unset) for the undo
            monkeypatch.delenv(name)

    return scratch


# Precedence: the file below the FULMEN_* variables, below the command line.

PRECEDENCE = [
    # option, file line, variable, its value, command-line args, expected file/env/cli values
    ("port", "port = 8001", "FULMEN_PORT", "8002", ["--port", "8003"], (8001, 8002, 8003)),
    (
        "access_log",
        "access_log = false",
        "FULMEN_ACCESS_LOG",
        "true",
        ["--no-access-log"],
        (False, True, False),
    ),
    (
        "http",
        'http = "h11"',
        "FULMEN_HTTP",
        "httptools",
        ["--http", "auto"],
        ("h11", "httptools", "auto"),
    ),
    (
        "headers",
        'headers = ["X-A: 1", "X-B: 2"]',
        "FULMEN_HEADERS",
        "X-C: 3",
        ["--header", "X-D: 4"],
        (("X-A: 1", "X-B: 2"), ("X-C: 3",), ("X-D: 4",)),
    ),
]


@pytest.mark.parametrize(
    ("name", "line", "variable", "raw", "args", "expected"),
    PRECEDENCE,
    ids=[row[0] for row in PRECEDENCE],
)
def test_command_line_beats_environment_beats_file(
    tmp_path, invoke, name, line, variable, raw, args, expected
) -> None:
    path = write(tmp_path, line + "\n")
    _, defaults = invoke([APP])
    assert defaults[name] != expected[0]  # the file changes the option
    _, from_file = invoke([APP, "--config", path])
    assert from_file[name] == expected[0]
    assert from_file["config"] == path
    _, from_env = invoke([APP, "--config", path], env={variable: raw})
    assert from_env[name] == expected[1]
    _, from_cli = invoke([APP, "--config", path, *args], env={variable: raw})
    assert from_cli[name] == expected[2]


def test_config_path_from_environment_and_file_values_checked_by_config(tmp_path, invoke) -> None:
    path = write(
        tmp_path, 'app = "tests.apps:other"\ntimeout_keep_alive = 3\nreload_dirs = "src"\n'
    )
    app, options = invoke([], env={"FULMEN_CONFIG": path})
    assert app == "tests.apps:other"  # APP from the file
    assert options["timeout_keep_alive"] == 3.0
    assert options["reload_dirs"] == ("src",)  # one string is one value
    app, _ = invoke([APP], env={"FULMEN_CONFIG": path})
    assert app == APP  # the argument wins over the file


def test_app_from_the_file_is_served(tmp_path) -> None:
    path = write(tmp_path, 'app = "tests.apps:app"\nport = 0\nlifespan = "off"\n')
    with Fulmen("--config", path) as server:
        response = httpx.get(server.url + "/hello", timeout=TIMEOUT)
        assert response.status_code == 200
        assert "hello" in response.text


def test_missing_app_is_still_a_usage_error(tmp_path) -> None:
    path = write(tmp_path, "port = 8001\n")
    result = run_fulmen("--config", path)
    assert result.returncode == 2
    assert "Missing argument 'APP'" in result.stderr


# Bad files: usage errors (exit 2) that name the file and the key.


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 8001\n", "unknown fulmen option 'prot'; did you mean 'port'?"),
        ("reuse-port = true\n", "unknown fulmen option 'reuse-port'; did you mean 'reuse_port'?"),
        ("port = 8001\nport = 8002\n", "invalid TOML: Cannot overwrite a value (at line 2"),
        ("port 8001\n", "invalid TOML: Expected '=' after a key"),
        ('port = "8001"\n', "port must be an integer, not '8001'"),
        ("port = true\n", "port must be an integer, not True"),
        ("access_log = 1\n", "access_log must be true or false, not 1"),
        ("use_colors = 'yes'\n", "use_colors must be true or false, not 'yes'"),
        ("timeout_keep_alive = '5'\n", "timeout_keep_alive must be a number, not '5'"),
        ('loop = "bogus"\n', "loop must be one of auto, asyncio, uvloop, not 'bogus'"),
        ('headers = ["X-A: 1", 2]\n', "headers must be a list of strings, not ['X-A: 1', 2]"),
        ("root_path = 1\n", "root_path must be a string, not 1"),
        ("app = 1\n", "app must be a string 'module:attribute', not 1"),
        ("[server]\nport = 1\n", "unknown fulmen option 'server'"),
        ('config = "other.toml"\n', "'config' cannot be set in a configuration file"),
    ],
)
def test_bad_file_is_a_usage_error(tmp_path, text, message) -> None:
    path = write(tmp_path, text)
    result = run_fulmen(APP, "--config", path)
    assert result.returncode == 2, result.stderr
    assert f"Error: {path}: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(
        ConfigFileError, match="^" + re.escape(path)
    ):  # Python gets the same message
        Config(APP, config=path)


def test_missing_config_file(tmp_path) -> None:
    missing = str(tmp_path / "nope.toml")
    result = run_fulmen(APP, "--config", missing)
    assert result.returncode == 2
    assert "Error: Invalid value for '--config': File" in result.stderr
    with pytest.raises(ConfigFileError, match=r"cannot read configuration file .*nope\.toml"):
        Config(APP, config=missing)


def test_a_value_the_option_rejects_is_a_usage_error(tmp_path) -> None:
    path = write(tmp_path, "port = 70000\n")
    result = run_fulmen(APP, "--config", path)
    assert result.returncode == 2
    assert "Error: port must be between 0 and 65535, not 70000" in result.stderr


def test_python_3_10_needs_tomli(tmp_path, monkeypatch) -> None:
    path = write(tmp_path, "port = 8001\n")
    monkeypatch.setattr(sys, "version_info", (3, 10, 14))
    tomllib = pytest.importorskip("tomllib")
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # tomli is the package tomllib came from
    assert read_config_file(path, OPTION_FIELDS) == {"port": 8001}
    monkeypatch.setitem(sys.modules, "tomli", None)  # not installed
    with pytest.raises(ConfigFileError, match=r"needs Python 3\.11 or the 'tomli' package"):
        read_config_file(path, OPTION_FIELDS)


# Python: keyword arguments win over the file.


def test_python_keywords_win_over_the_file(tmp_path) -> None:
    path = write(tmp_path, 'app = "tests.apps:other"\nport = 8001\nhttp = "h11"\nbacklog = 10\n')
    config = Config(APP, config=path, port=8005, backlog=2048)
    assert config.app == APP  # the argument, not the file's app
    assert config.port == 8005
    assert config.backlog == 2048  # even a keyword equal to the default wins
    assert config.http == "h11"  # from the file
    assert config.config == path
    with pytest.raises(TypeError, match="did you mean 'port'"):
        Config(APP, config=path, prot=1)


def test_run_reads_the_file(tmp_path) -> None:
    """`fulmen.run(app, config=...)` in a script: the file's options, the keywords over them."""
    path = write(tmp_path, "port = 1\nlifespan = 'off'\nlog_level = 'critical'\n")
    script = (
        "import fulmen, sys\n"
        f"fulmen.run('tests.apps:app', config={path!r}, port=0, log_level='info')\n"
    )
    command = [sys.executable, "-c", script]
    with Process(command, clean_env()) as proc:
        port = int(proc.stderr.wait_for(STARTED).group(1).rsplit(":", 1)[1])
        assert port != 1
        assert httpx.get(f"http://127.0.0.1:{port}/x", timeout=TIMEOUT).status_code == 200


# --env-file


def test_env_file_reaches_the_app(tmp_path) -> None:
    env_file = write(
        tmp_path,
        "GREETING=hello world\nKEPT=from file\nFULMEN_LOG_LEVEL=critical\nREF=${GREETING}!\n",
        ".env",
    )
    env = clean_env(KEPT="from environment")
    with Fulmen(
        ENVIRON_APP, "--port", "0", "--lifespan", "off", "--env-file", env_file, env=env
    ) as server:
        # (FULMEN_LOG_LEVEL=critical did not configure fulmen: the startup line was logged.)
        def get(name: str) -> str:
            return httpx.get(f"{server.url}/{name}", timeout=TIMEOUT).text

        assert get("GREETING") == "hello world"
        assert get("REF") == "hello world!"
        assert get("KEPT") == "from environment"  # the real environment wins
        assert get("FULMEN_LOG_LEVEL") == "critical"  # the app sees it
        server.stderr.wait_for(r"\.env sets FULMEN_LOG_LEVEL for the application only")


def test_env_file_named_in_the_config_file(tmp_path) -> None:
    env_file = write(tmp_path, "GREETING=from the env file\n", ".env")
    path = write(
        tmp_path, f"app = {ENVIRON_APP!r}\nport = 0\nlifespan = 'off'\nenv_file = {env_file!r}\n"
    )
    with Fulmen("--config", path) as server:
        response = httpx.get(f"{server.url}/GREETING", timeout=TIMEOUT)
        assert response.text == "from the env file"


def test_env_file_applies_to_web_concurrency_and_forwarded_allow_ips(tmp_path, scratch_env) -> None:
    scratch_env("WEB_CONCURRENCY", "FORWARDED_ALLOW_IPS")
    env_file = write(tmp_path, "WEB_CONCURRENCY=3\nFORWARDED_ALLOW_IPS=10.0.0.1\n", ".env")
    config = Config(APP, env_file=env_file)
    assert config.workers == 3
    assert config.trusted_hosts == ["10.0.0.1"]
    assert os.environ["WEB_CONCURRENCY"] == "3"


def test_missing_env_file(tmp_path) -> None:
    missing = str(tmp_path / "nope.env")
    result = run_fulmen(APP, "--env-file", missing)
    assert result.returncode == 2
    assert "Error: Invalid value for '--env-file': File" in result.stderr
    with pytest.raises(ConfigFileError, match=r"env file .*nope\.env' does not exist"):
        Config(APP, env_file=missing)


def test_env_file_needs_python_dotenv(tmp_path, monkeypatch) -> None:
    env_file = write(tmp_path, "A=1\n", ".env")
    monkeypatch.setitem(sys.modules, "dotenv", None)
    with pytest.raises(ConfigFileError, match="--env-file needs the 'python-dotenv' package"):
        load_env_file(env_file)
