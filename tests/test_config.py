"""`fulmen.config`: the option table, defaults, validation and the typo check."""

from __future__ import annotations

import dataclasses

import pytest

import fulmen
from fulmen.config import OPTION_FIELDS, OPTION_NAMES, Config, check_options


async def app(scope, receive, send):
    raise AssertionError("never served")


# Defaults shared with uvicorn's options of the same name, plus fulmen's own bounded ones.
EXPECTED_DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8000,
    "uds": None,
    "fd": None,
    "loop": "auto",
    "http": "auto",
    "lifespan": "auto",
    "interface": "auto",
    "root_path": "",
    "limit_concurrency": None,
    "limit_max_requests": None,
    "backlog": 2048,
    "timeout_keep_alive": 5,
    "log_level": "info",
    "access_log": True,
    "use_colors": None,
    "proxy_headers": True,
    "server_header": True,
    "date_header": True,
    "headers": [],
    "factory": False,
    "h11_max_incomplete_event_size": 16 * 1024,
    # uvicorn waits forever by default; fulmen bounds a graceful shutdown.
    "timeout_graceful_shutdown": 30,
}


@pytest.mark.parametrize(("name", "expected"), EXPECTED_DEFAULTS.items())
def test_defaults(name, expected, monkeypatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert getattr(Config(app), name) == expected


def test_every_option_is_documented() -> None:
    assert {f.name for f in OPTION_FIELDS} == OPTION_NAMES
    assert "app" not in OPTION_NAMES
    for f in OPTION_FIELDS:
        assert f.metadata["help"].strip(), f.name


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("prot", "port"),
        ("timeout_keepalive", "timeout_keep_alive"),
        ("forwarded_allow_ip", "forwarded_allow_ips"),
        ("header", "headers"),
    ],
)
def test_typo_suggests_the_near_option(typo, suggestion) -> None:
    with pytest.raises(
        TypeError, match=f"unknown fulmen option '{typo}'; did you mean '{suggestion}'"
    ):
        Config(app, **{typo: 1})


def test_unknown_option_without_near_name() -> None:
    with pytest.raises(TypeError) as info:
        Config(app, zzzzzz=1)
    assert str(info.value) == "unknown fulmen option 'zzzzzz'"


def test_run_rejects_a_typo_before_serving() -> None:
    # Raised while building the Config: nothing is bound, nothing is served.
    with pytest.raises(TypeError, match="did you mean 'log_level'"):
        fulmen.run(app, log_levle="debug")


def test_check_options_accepts_every_option() -> None:
    check_options(dict.fromkeys(OPTION_NAMES))


CHOICE_FIELDS = [f for f in OPTION_FIELDS if f.metadata["choices"]]


@pytest.mark.parametrize("field", CHOICE_FIELDS, ids=lambda f: f.name)
def test_invalid_choice_raises(field: dataclasses.Field) -> None:
    with pytest.raises(ValueError, match=f"{field.name} must be one of"):
        Config(app, **{field.name: "nonsense"})
    for choice in field.metadata["choices"]:
        assert getattr(Config(app, **{field.name: choice}), field.name) == choice


def test_choice_fields() -> None:
    assert {f.name for f in CHOICE_FIELDS} == {
        "loop",
        "http",
        "ws",
        "lifespan",
        "interface",
        "log_level",
        "log_format",
        "proxy_headers_mode",
    }


@pytest.mark.parametrize("port", [-1, 65536])
def test_port_out_of_range_raises(port) -> None:
    with pytest.raises(ValueError, match="port must be between 0 and 65535"):
        Config(app, port=port)


def test_forwarded_allow_ips_defaults_to_loopback(monkeypatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    config = Config(app)
    assert config.forwarded_allow_ips == "127.0.0.1"
    assert config.trusted_hosts == ["127.0.0.1"]


def test_forwarded_allow_ips_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", " 10.0.0.1 , 192.168.0.0/16,, ")
    config = Config(app)
    assert config.forwarded_allow_ips == " 10.0.0.1 , 192.168.0.0/16,, "
    assert config.trusted_hosts == ["10.0.0.1", "192.168.0.0/16"]
    # An explicit value wins over the environment.
    assert Config(app, forwarded_allow_ips="*").trusted_hosts == ["*"]


def test_header_pairs() -> None:
    config = Config(app, headers=["X-A: 1", "X-B:two:three", " X-C :  spaced out  ", "X-D:"])
    assert config.header_pairs() == [
        ("X-A", "1"),
        ("X-B", "two:three"),
        ("X-C", "spaced out"),
        ("X-D", ""),
    ]
    assert Config(app).header_pairs() == []


@pytest.mark.parametrize("header", ["no colon", ": no name", "   : blank name"])
def test_malformed_header_raises_at_configuration(header) -> None:
    with pytest.raises(ValueError, match="--header must be 'Name: value'"):
        Config(app, headers=[header])


def test_config_takes_an_import_string_or_an_object() -> None:
    assert Config("tests.apps:app").app == "tests.apps:app"
    assert Config(app).app is app
    with pytest.raises(TypeError):
        Config(app, 8000)  # options are keyword-only
