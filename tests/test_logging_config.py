"""--log-config, --log-format and --access-log-format."""

from __future__ import annotations

import configparser
import datetime
import io
import json
import logging
import socket
import sys
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from fulmen import Config
from fulmen.access import AccessFormat
from fulmen.logging import (
    LOGGING_CONFIG,
    JsonFormatter,
    LogConfigError,
    apply_log_config,
    configure_logging,
)
from tests.apps_logging import app
from tests.conftest import TIMEOUT, recv_response
from tests.helpers import Fulmen, run_fulmen

APP = "tests.apps_logging:app"
ALL_ATOMS = (
    "%(client)s|%(method)s|%(path)s|%(query)s|%(target)s|%(protocol)s|%(scheme)s|%(status)d|"
    "%(bytes)d|%(duration_ms).1f|%(timestamp)s|%({User-Agent}i)s|%({x-id}o)s|%({missing}i)s"
)


@pytest.fixture
def default_logging():
    """Put fulmen's default configuration back after a test that configures logging."""
    yield
    configure_logging("info", True, None)
    logging.getLogger().handlers.clear()


def get(sock: socket.socket, target: str, extra: str = "") -> bytes:
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode("latin-1"))
    return recv_response(sock)


def access_records(srv) -> list[logging.LogRecord]:
    return [r for r in srv.records if r.name == "fulmen.access"]


# --access-log-format


def test_every_atom(serve) -> None:
    with serve(app, log_level="info", access_log_format=ALL_ATOMS) as srv, srv.connect() as sock:
        assert get(sock, "/p%20q?a=1&b", "User-Agent: tester/1\r\n").startswith(b"HTTP/1.1 200 ")
        port = sock.getsockname()[1]
    (record,) = access_records(srv)
    parts = record.getMessage().split("|")
    assert parts[:10] == [
        f"127.0.0.1:{port}",
        "GET",
        "/p q",
        "a=1&b",
        "/p q?a=1&b",
        "HTTP/1.1",
        "http",
        "200",
        "11",  # both body chunks, not the framing
        parts[9],
    ]
    assert 0.0 <= float(parts[9]) < TIMEOUT * 1000
    assert datetime.datetime.fromisoformat(parts[10]).tzinfo is not None
    assert parts[11:] == ["tester/1", "seven", "-"]
    assert record.status_code == 200
    assert record.access["bytes"] == 11 and record.access["{x-id}o"] == "seven"


def test_untimed_format_does_not_wrap_the_app(serve_one) -> None:
    with serve_one(app, log_level="info", access_log_format="%(status)d %(path)s") as srv:
        state = srv.server.state
        assert state.access_format.timed is False
        assert state.app is app  # no timing wrapper: bytes and duration are not used
        with srv.connect() as sock:
            get(sock, "/x")
    assert [r.getMessage() for r in access_records(srv)] == ["200 /x"]


def test_timed_format_counts_a_500(serve_one) -> None:
    fmt = "%(status)d %(bytes)d %(duration_ms).0f"
    with serve_one(app, log_level="info", access_log_format=fmt) as srv, srv.connect() as sock:
        assert get(sock, "/boom").startswith(b"HTTP/1.1 500 ")
    (record,) = access_records(srv)
    assert record.getMessage().startswith("500 0 ")


def test_atoms_escape_control_characters(serve_one) -> None:
    fmt = "%(path)s %(query)s %({x-h}i)s"
    with serve_one(app, log_level="info", access_log_format=fmt) as srv, srv.connect() as sock:
        get(sock, "/a%0Ab%1B[31m?q=%0D", "X-H: v\x80\r\n")
    (record,) = access_records(srv)
    assert record.getMessage() == "/a\\x0ab\\x1b[31m q=%0D v\\x80"
    assert record.access["path"] == "/a\nb\x1b[31m"  # raw: JSON lines encode it


def test_websocket_lines(serve_one) -> None:
    fmt = "%(method)s %(scheme)s %(path)s %(status)d %({x-id}o)s %(bytes)d"
    with serve_one(app, log_level="info", access_log_format=fmt) as srv:
        with ws_connect(f"ws://127.0.0.1:{srv.port}/chat", open_timeout=TIMEOUT) as ws:
            ws.recv_streaming  # noqa: B018 - the app closes right after accepting
        with srv.connect() as sock:  # a refused handshake is an HTTP line
            sock.sendall(
                b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            assert recv_response(sock).startswith(b"HTTP/1.1 400 ")
    assert [r.getMessage() for r in access_records(srv)] == [
        "GET ws /chat 101 ws 0",
        "GET http /plain 400 - 0",
    ]


@pytest.mark.parametrize(
    ("fmt", "error"),
    [
        ("%(nope)s", "unknown atom %(nope)"),
        ("%(status)q", "not a valid format"),
        ("%(client)d", "not a valid format"),
        ("%({bad name}i)s", "unknown atom"),
    ],
)
def test_bad_formats(fmt: str, error: str) -> None:
    with pytest.raises(ValueError, match="access_log_format") as info:
        Config(app, access_log_format=fmt)
    assert error in str(info.value)


def test_bad_format_on_the_command_line() -> None:
    result = run_fulmen(APP, "--access-log-format", "%(nope)s")
    assert result.returncode == 2
    assert "unknown atom %(nope)" in result.stderr


def test_format_atoms_are_parsed_once() -> None:
    fmt = AccessFormat("%(status)d %(status)d %({A}i)s %({a}o)s")
    assert fmt.atoms == ["status"]
    assert fmt.request_headers == [("{A}i", b"a")]
    assert fmt.response_headers == [("{a}o", b"a")]


# --log-format json


def test_json_lines_from_a_server() -> None:
    with Fulmen(APP, "--port", "0", "--lifespan", "off", "--log-format", "json") as server:
        clients = []
        for target in ("/ok?x=1", "/new%0Aline%1B%E2%80%A8", "/boom"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
                assert get(sock, target).startswith(b"HTTP/1.1 ")
                clients.append(f"127.0.0.1:{sock.getsockname()[1]}")
            server.stdout.wait_for(clients[-1])
        client = clients[0]
        server.signal()
        assert server.wait() == 0
    access = [json.loads(line) for line in server.stdout.lines]  # every line is one object
    errors = [json.loads(line) for line in server.stderr.lines]
    assert [a["target"] for a in access] == ["/ok?x=1", "/new\nline\x1b\u2028", "/boom"]
    first = access[0]
    assert first["message"] == f'{client} - "GET /ok?x=1 HTTP/1.1" 200 OK'
    assert {k: first[k] for k in ("level", "logger", "client", "target", "status")} == {
        "level": "INFO",
        "logger": "fulmen.access",
        "client": client,
        "target": "/ok?x=1",
        "status": 200,
    }
    assert datetime.datetime.fromisoformat(first["timestamp"]).tzinfo is not None
    assert access[1]["message"].endswith('"GET /new\\x0aline\\x1b\\u2028 HTTP/1.1" 200 OK')
    assert {e["logger"] for e in errors} == {"fulmen.error"}
    (failure,) = [e for e in errors if e["level"] == "ERROR"]
    assert failure["message"] == "Exception in ASGI application"
    assert failure["exception"].startswith("Traceback (most recent call last):")
    assert failure["exception"].endswith("RuntimeError: boom\ninjected line")
    assert not any("injected" in line and "exception" not in line for line in server.stderr.lines)


def test_json_access_lines_in_process(serve_one) -> None:
    with serve_one(app, log_level="info", log_format="json") as srv, srv.connect() as sock:
        get(sock, "/j")
        port = sock.getsockname()[1]
    (record,) = access_records(srv)
    assert record.access == {
        "client": f"127.0.0.1:{port}",
        "method": "GET",
        "target": "/j",
        "protocol": "HTTP/1.1",
        "status": 200,
        "reason": "OK",
    }
    line = JsonFormatter().format(record)
    assert json.loads(line)["message"] == f'127.0.0.1:{port} - "GET /j HTTP/1.1" 200 OK'


def test_json_formatter_never_writes_a_raw_line_break() -> None:
    try:
        raise ValueError("bad\r\nvalue")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "fulmen.error", logging.ERROR, __file__, 1, "x%s", ("\n\u2028\u2029\x1b",), exc_info
    )
    record.stack_info = "Stack (most recent call last):\n  here"
    line = JsonFormatter().format(record)
    assert line.isascii() and "\n" not in line and "\r" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "x\n\u2028\u2029\x1b"
    assert parsed["exception"].endswith("ValueError: bad\r\nvalue")
    assert parsed["stack"].endswith("here")
    record.exc_info = None
    record.exc_text = "cached traceback"
    assert json.loads(JsonFormatter().format(record))["exception"] == "cached traceback"


def test_json_and_text_configurations(default_logging) -> None:
    configure_logging("debug", True, None, log_format="json")
    for name in ("fulmen", "fulmen.access"):
        (handler,) = logging.getLogger(name).handlers
        assert isinstance(handler.formatter, JsonFormatter)
    assert "()" not in str(LOGGING_CONFIG["formatters"]["default"]["()"]).replace("()", "")


# --log-config


ERROR_TO_STDOUT = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"custom": {"format": "CUSTOM %(levelname)s %(name)s %(message)s"}},
    "handlers": {
        "out": {
            "class": "logging.StreamHandler",
            "formatter": "custom",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {"fulmen": {"handlers": ["out"], "level": "INFO", "propagate": False}},
}
INI = """
[loggers]
keys=root,fulmen

[handlers]
keys=out

[formatters]
keys=custom

[logger_root]
level=WARNING
handlers=

[logger_fulmen]
level=INFO
handlers=out
propagate=0
qualname=fulmen

[handler_out]
class=StreamHandler
formatter=custom
args=(sys.stdout,)

[formatter_custom]
format=CUSTOM %(levelname)s %(name)s %(message)s
"""


def write_config(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"logging{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ERROR_TO_STDOUT))
    elif suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(ERROR_TO_STDOUT))
    else:
        path.write_text(INI)
    return path


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml", ".ini", ".conf"])
def test_config_files(tmp_path: Path, suffix: str) -> None:
    path = write_config(tmp_path, suffix)
    args = ("--port", "0", "--lifespan", "off", "--log-config", str(path))
    with Fulmen(APP, *args, wait_started=False) as server:
        address = server.stdout.wait_for(r"CUSTOM INFO fulmen.error Fulmen running on (\S+)")
        port = int(address.group(1).rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            assert get(sock, "/a").startswith(b"HTTP/1.1 200 ")
        line = server.stdout.wait_for("CUSTOM INFO fulmen.access ").string
        server.signal()
        assert server.wait() == 0
    assert line.endswith('"GET /a HTTP/1.1" 200 OK')
    assert server.stderr.lines == []  # fulmen's own handlers were replaced


def test_config_forms_from_python(tmp_path: Path, capsys, default_logging) -> None:
    parser = configparser.RawConfigParser()
    parser.read_string(INI)
    forms = [ERROR_TO_STDOUT, parser, io.StringIO(INI), tmp_path / "x.json"]
    write_config(tmp_path, ".json").rename(tmp_path / "x.json")
    for form in forms:
        configure_logging("debug", True, None, log_config=form)
        logging.getLogger("fulmen.error").info("hello %s", type(form).__name__)
        assert logging.getLogger("fulmen").level == logging.INFO  # the file's, not --log-level
    assert capsys.readouterr().out.splitlines() == [
        f"CUSTOM INFO fulmen.error hello {type(form).__name__}" for form in forms
    ]


def test_no_access_log_still_wins_over_the_config(default_logging) -> None:
    configure_logging("info", False, None, log_config=ERROR_TO_STDOUT)
    assert not logging.getLogger("fulmen.access").isEnabledFor(logging.CRITICAL)


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"version": 2}, "the log_config dict: ValueError"),
        (io.StringIO("[nothing]\n"), "the log_config object: KeyError"),
        (42, "not int"),
    ],
)
def test_bad_python_forms(form, error: str, default_logging) -> None:
    with pytest.raises(LogConfigError, match=error):
        apply_log_config(form)


def test_bad_files(tmp_path: Path, default_logging) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.yaml").write_text("a: [b")
    with pytest.raises(LogConfigError, match=r"bad.json'.*Expecting property name"):
        apply_log_config(str(tmp_path / "bad.json"))
    with pytest.raises(LogConfigError, match=r"bad.yaml'"):
        apply_log_config(tmp_path / "bad.yaml")
    with pytest.raises(LogConfigError, match="no such file"):
        apply_log_config(str(tmp_path / "missing.ini"))
    with pytest.raises(LogConfigError, match="No such file"):
        apply_log_config(str(tmp_path / "missing.yml"))


def test_yaml_without_pyyaml(tmp_path: Path, monkeypatch, default_logging) -> None:
    path = write_config(tmp_path, ".yaml")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    with pytest.raises(LogConfigError, match=r"YAML needs PyYAML \(pip install pyyaml\)"):
        apply_log_config(str(path))


@pytest.mark.parametrize("mode", [(), ("--workers", "2"), ("--reload",)])
def test_bad_file_is_a_startup_error(tmp_path: Path, mode: tuple[str, ...]) -> None:
    path = tmp_path / "missing.conf"
    result = run_fulmen(APP, "--port", "0", "--log-config", str(path), *mode)
    assert result.returncode == 3
    assert f"Cannot apply log config file '{path}': no such file" in result.stderr
    assert "Traceback" not in result.stderr
