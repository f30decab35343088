"""The ways into HTTP/2: ALPN over TLS (httpx), h2c prior knowledge (curl, nghttp, h2load), and
`Upgrade: h2c` from HTTP/1.1 (curl, raw bytes), with and without a request body."""

from __future__ import annotations

import base64
import shutil
import subprocess
from typing import Any

import h2.settings
import httpx
import pytest

from tests.conftest import TIMEOUT
from tests.protocols.h2client import H2Client
from tests.protocols.test_http2 import echo

pytestmark = pytest.mark.timeout(60)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_alpn_h2_over_tls_with_httpx(serve, certs) -> None:
    with serve(echo, ssl_certfile=certs.cert, ssl_keyfile=certs.key) as srv:
        url = f"https://localhost:{srv.port}/tls?q=1"
        with httpx.Client(http2=True, verify=certs.context()) as client:
            responses = [client.post(url, content=b"body %d" % n) for n in range(3)]
    assert [r.http_version for r in responses] == ["HTTP/2"] * 3
    assert [r.content for r in responses] == [b"body %d" % n for n in range(3)]
    assert responses[0].headers["x-scheme"] == "https"
    assert responses[0].headers["x-version"] == "2"


def test_alpn_http11_client_is_served_http11(serve_one, certs) -> None:
    with (
        serve_one(echo, ssl_certfile=certs.cert, ssl_keyfile=certs.key) as srv,
        httpx.Client(verify=certs.context()) as client,
    ):
        response = client.get(f"https://localhost:{srv.port}/")
    assert response.http_version == "HTTP/1.1"
    assert response.headers["x-version"] == "1.1"


def test_alpn_offers_only_http11_without_http2(serve_one, certs) -> None:
    with serve_one(echo, ssl_certfile=certs.cert, ssl_keyfile=certs.key, http2=False) as srv:
        context = certs.context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with srv.connect() as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"


def test_h2_only_tls_client(serve_one, certs) -> None:
    """A client that offers only h2 (prior knowledge over TLS) is served HTTP/2."""
    with serve_one(echo, ssl_certfile=certs.cert, ssl_keyfile=certs.key) as srv:
        context = certs.context()
        context.set_alpn_protocols(["h2"])
        raw = srv.connect()
        tls = context.wrap_socket(raw, server_hostname="localhost")
        assert tls.selected_alpn_protocol() == "h2"
        response = H2Client(tls).get("/only")  # type: ignore[arg-type]
        tls.close()  # before the server stops: it would wait for the TLS close_notify
    assert response.fields[b"x-scheme"] == b"https"


def _settings_header() -> bytes:
    payload = b"\x00\x03\x00\x00\x00\x64"  # MAX_CONCURRENT_STREAMS 100
    return base64.urlsafe_b64encode(payload).rstrip(b"=")


def _upgrade_request(body: bytes = b"", settings: bytes | None = None) -> bytes:
    settings = _settings_header() if settings is None else settings
    head = (
        b"POST /up HTTP/1.1\r\nhost: test\r\nconnection: Upgrade, HTTP2-Settings\r\n"
        b"upgrade: h2c\r\nhttp2-settings: %b\r\ncontent-length: %d\r\n\r\n" % (settings, len(body))
    )
    return head + body


@pytest.mark.parametrize("body", [b"", b"payload " * 100])
def test_upgrade_h2c_answers_on_stream_1(serve, body) -> None:
    with serve(echo) as srv:
        sock = srv.connect()
        sock.sendall(_upgrade_request(body))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"upgrade: h2c" in head.lower()
        client = H2Client(sock, preface=False)
        client.conn.initiate_upgrade_connection()  # the preface, and stream 1 half-closed
        client.flush()
        first = client.response(1)
        second = client.get("/after")
    assert first.status == 200
    assert first.body == body
    assert first.fields[b"x-method"] == b"POST"
    assert first.fields[b"x-version"] == b"2"
    assert second.fields[b"x-path"] == b"/after"


@pytest.mark.parametrize(
    "request_bytes",
    [
        _upgrade_request(settings=b"!!!not base64"),
        _upgrade_request(settings=b"AAMA"),  # not a whole setting
        _upgrade_request(settings=base64.urlsafe_b64encode(b"\x00\x02\x00\x00\x00\x02")),  # push=2
        _upgrade_request(b"x" * 70_000),  # a body too large to read first
        b"GET / HTTP/1.1\r\nhost: t\r\nconnection: Upgrade\r\nupgrade: h2c\r\n\r\n",  # no settings
    ],
)
def test_upgrade_h2c_not_followed_is_served_over_http11(serve_one, request_bytes) -> None:
    with serve_one(echo) as srv:
        sock = srv.connect()
        sock.sendall(request_bytes)
        data = sock.recv(65536)
        sock.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x-version: 1.1" in data


def test_upgrade_h2c_ignored_without_http2(serve_one) -> None:
    with serve_one(echo, http2=False) as srv:
        sock = srv.connect()
        sock.sendall(_upgrade_request(b"abc"))
        data = sock.recv(65536)
        sock.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")


def test_curl_prior_knowledge_and_upgrade(serve_one) -> None:
    curl = _tool("curl")
    with serve_one(echo) as srv:
        prior = _run(curl, "-s", "--http2-prior-knowledge", "-D", "-", f"{srv.url}/p", "-d", "x=1")
        upgrade = _run(curl, "-s", "--http2", "-D", "-", f"{srv.url}/u")
    assert prior.returncode == 0, prior.stderr
    assert prior.stdout.startswith("HTTP/2 200")
    assert prior.stdout.endswith("x=1")
    assert upgrade.returncode == 0, upgrade.stderr
    assert "HTTP/1.1 101 Switching Protocols" in upgrade.stdout
    assert "HTTP/2 200" in upgrade.stdout
    assert "x-path: /u" in upgrade.stdout


def test_nghttp_with_a_tiny_window(serve_one) -> None:
    """nghttp grants 1 KiB windows (-w/-W 10): a 300 KB body arrives whole, within them."""
    nghttp = _tool("nghttp")
    big = b"w" * 300_000

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": big[:100_000], "more_body": True})
        await send({"type": "http.response.body", "body": big[100_000:]})

    with serve_one(app) as srv:
        result = subprocess.run(
            [nghttp, "-w", "10", "-W", "10", f"{srv.url}/"],
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == big


def test_h2load_many_streams(serve) -> None:
    h2load = _tool("h2load")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app, access_log=False) as srv:
        result = _run(h2load, "-n", "2000", "-c", "4", "-m", "32", f"{srv.url}/")
    assert result.returncode == 0, result.stderr
    assert "2000 succeeded, 0 failed, 0 errored, 0 timeout" in result.stdout
    assert "status codes: 2000 2xx" in result.stdout


def test_settings_offered(serve_one) -> None:
    with serve_one(echo, h2_max_concurrent_streams=7, h11_max_incomplete_event_size=8000) as srv:
        client = H2Client(srv.connect())
        client.get()
    remote = client.conn.remote_settings
    assert remote[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    assert remote[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == 8000
    assert remote[h2.settings.SettingCodes.ENABLE_PUSH] == 0


def test_http2_option() -> None:
    """HTTP/2 is fulmen's own code: on by default, with no extra library; `--no-http2` turns
    it off."""
    from fulmen import Config

    assert Config("m:app").use_http2
    assert not Config("m:app", http2=False).use_http2
    with pytest.raises(ValueError, match="at least 1"):
        Config("m:app", h2_max_concurrent_streams=0)
