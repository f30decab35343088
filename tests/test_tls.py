"""TLS: serving HTTPS and WSS with certificates from a test CA (trustme), versions, ALPN, client
certificates, encrypted keys, timeouts over TLS, and clear startup errors."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from fulmen import Config
from fulmen.protocols.tls_scope import dn_string
from fulmen.tls import ALPN_PROTOCOLS, TLSError, create_ssl_context
from tests.conftest import PASSWORD, TIMEOUT, Certs, wss_first_message
from tests.helpers import Fulmen, messages, record_logs, run_fulmen
from tests.protocols.http1_raw import in_loop, poll_until


async def scheme_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": scope["scheme"]})
        await send({"type": "websocket.close"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["scheme"].encode()})


@pytest.fixture(params=["asyncio", "uvloop"])
def serve_tls(
    request: pytest.FixtureRequest, serve_one: Callable[..., Any], certs: Certs
) -> Callable[..., contextlib.AbstractContextManager[Any]]:
    """`with serve_tls(app, **options) as srv:` over TLS with the test certificate, per loop."""

    def start(app: Any, **options: Any) -> contextlib.AbstractContextManager[Any]:
        options.setdefault("ssl_certfile", certs.cert)
        options.setdefault("ssl_keyfile", certs.key)
        return serve_one(app, loop=request.param, **options)  # type: ignore[no-any-return]

    return start


def https(srv: Any, path: str = "/") -> str:
    return f"https://127.0.0.1:{srv.port}{path}"


def get(srv: Any, context: ssl.SSLContext) -> str:
    """GET / over HTTPS with this client context: the body."""
    with httpx.Client(verify=context, timeout=TIMEOUT) as client:
        return client.get(https(srv)).text


@contextlib.contextmanager
def tls_connect(port: int, context: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            yield tls
    finally:
        raw.close()


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def relaxed_client(minimum: ssl.TLSVersion, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers exactly these versions, old ones included (OpenSSL's security level
    would otherwise keep it from offering TLS 1.0/1.1 at all)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are deprecated
        context.minimum_version = minimum
        context.maximum_version = maximum
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


# Serving


def test_https_verified_against_the_ca(serve_tls, certs, monkeypatch) -> None:
    with record_logs(monkeypatch) as logs, serve_tls(scheme_app) as srv:
        with httpx.Client(verify=certs.context(), timeout=TIMEOUT) as client:
            response = client.get(https(srv))
        assert response.status_code == 200
        assert response.text == "https"
        line = f"Fulmen running on https://127.0.0.1:{srv.port} (Press CTRL+C to quit)"
        assert line in messages(logs)


def test_alpn_selects_http11_without_http2(serve_tls, certs) -> None:
    assert ALPN_PROTOCOLS == ["http/1.1"]
    with serve_tls(scheme_app, http2=False) as srv:
        context = certs.context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with tls_connect(srv.port, context) as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
        context = certs.context()
        context.set_alpn_protocols(["h2"])  # no common protocol: the handshake goes on
        with tls_connect(srv.port, context) as tls:
            assert tls.selected_alpn_protocol() is None
            tls.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_until_closed(tls).endswith(b"\r\n\r\nhttps")


def test_tls_below_1_2_is_refused(serve_tls) -> None:
    with serve_tls(scheme_app) as srv:
        old = relaxed_client(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
        with pytest.raises(ssl.SSLError), tls_connect(srv.port, old):
            pass
        # The same client allowed TLS 1.2 is served: the version is what was refused.
        modern = relaxed_client(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_2)
        with tls_connect(srv.port, modern) as tls:
            assert tls.version() == "TLSv1.2"
        # TLS 1.3 is negotiated when the client offers it.
        with tls_connect(
            srv.port, relaxed_client(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
        ) as tls:
            assert tls.version() == "TLSv1.3"
        assert messages(srv.handler, logging.WARNING) == []  # a refused handshake is no error


def test_ssl_version_tlsv1_2_pins_tls_1_2(serve_one, certs) -> None:
    options = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key, "ssl_version": 5}
    with serve_one(scheme_app, **options) as srv:
        only_13 = relaxed_client(ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)
        with pytest.raises(ssl.SSLError), tls_connect(srv.port, only_13):
            pass
        with tls_connect(srv.port, certs.context()) as tls:
            assert tls.version() == "TLSv1.2"


@pytest.mark.parametrize(
    ("ciphers", "expected"), [("ECDHE+AESGCM", "GCM"), ("ECDHE+CHACHA20", "CHACHA20")]
)
def test_ssl_ciphers_choose_the_tls_1_2_ciphers(serve_one, certs, ciphers, expected) -> None:
    options = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key, "ssl_ciphers": ciphers}
    with serve_one(scheme_app, **options) as srv:
        client = relaxed_client(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
        with tls_connect(srv.port, client) as tls:
            assert expected in tls.cipher()[0]


def test_client_certificate_required(serve_tls, certs) -> None:
    options = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": certs.ca_file}
    with serve_tls(scheme_app, **options) as srv:
        for refused in (None, certs.stranger):  # no certificate, or one from another CA
            with pytest.raises(httpx.TransportError):
                get(srv, certs.context(refused))
        assert get(srv, certs.context(certs.client)) == "https"


def test_client_certificate_optional(serve_one, certs) -> None:
    options = {
        "ssl_certfile": certs.cert,
        "ssl_keyfile": certs.key,
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_ca_certs": certs.ca_file,
    }
    with serve_one(scheme_app, **options) as srv:
        assert get(srv, certs.context()) == "https"
        with pytest.raises(httpx.TransportError):  # sent, so verified
            get(srv, certs.context(certs.stranger))


@pytest.mark.parametrize("form", ["encrypted", "combined"])
def test_key_forms(serve_one, certs, form) -> None:
    if form == "encrypted":
        options = {
            "ssl_certfile": certs.cert,
            "ssl_keyfile": certs.encrypted_key,
            "ssl_keyfile_password": PASSWORD,
        }
    else:  # the key in the certificate file
        options = {"ssl_certfile": certs.combined}
    with serve_one(scheme_app, **options) as srv:
        assert get(srv, certs.context()) == "https"


def test_websocket_over_tls_is_wss(serve_ws, certs) -> None:
    options = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key}
    with serve_ws(scheme_app, **options) as srv:
        uri = f"wss://127.0.0.1:{srv.port}/"
        assert wss_first_message(uri, certs.context()) == "wss"


# Timeouts and shutdown over TLS


def test_handshake_timeout_closes_a_silent_client(serve_tls) -> None:
    with serve_tls(scheme_app, timeout_tls_handshake=1.0) as srv, srv.connect() as raw:
        started = time.monotonic()
        assert read_until_closed(raw) == b""  # TCP open, no ClientHello: closed
        elapsed = time.monotonic() - started
    # asyncio's default would be 60 s; generous bounds for a loaded machine.
    assert 0.9 <= elapsed < 6, elapsed


def test_request_header_timeout_applies_over_tls(serve_tls, certs) -> None:
    with (
        serve_tls(scheme_app, timeout_request_header=1.0) as srv,
        tls_connect(srv.port, certs.context()) as tls,
    ):
        started = time.monotonic()
        tls.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # half a request head
        data = read_until_closed(tls)
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.9 <= elapsed < 6, elapsed


def test_a_handshake_under_way_at_shutdown_is_served(serve_tls, certs) -> None:
    """A connection accepted before the listener closed, its handshake not done yet, is not
    cut: the shutdown waits for the handshake (bounded), then answers its request."""
    with serve_tls(scheme_app) as srv, srv.connect() as raw:
        state = srv.server.state
        poll_until(lambda: in_loop(srv, lambda: len(state.handshaking)) == 1, "not accepted")
        srv.server.should_exit = True
        poll_until(lambda: "Shutting down" in srv.messages(), "no shutdown")
        with certs.context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            data = read_until_closed(tls)
    assert data.startswith(b"HTTP/1.1 200 ")


def test_closes_over_tls_release_the_connection_once(serve_tls, certs, caplog) -> None:
    """TLS cannot half-close: an error response and a keep-alive timeout close at once, and
    the connection is released once, by `connection_lost` (nothing logged by the loop)."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    with serve_tls(scheme_app, limit_request_body=10, timeout_keep_alive=1) as srv:
        with tls_connect(srv.port, certs.context()) as tls:
            tls.sendall(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n")
            assert read_until_closed(tls).startswith(b"HTTP/1.1 413 ")
        with tls_connect(srv.port, certs.context()) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            assert read_until_closed(tls).endswith(b"https")  # closed at the timeout
        poll_until(lambda: not in_loop(srv, lambda: len(srv.server.state.connections)), "open")
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_graceful_shutdown_waits_for_a_tls_request(certs) -> None:
    args = ("--ssl-certfile", certs.cert, "--ssl-keyfile", certs.key, "--lifespan", "off")
    with Fulmen("tests.apps:app", *args) as server:
        assert server.url.startswith("https://127.0.0.1:")
        results: list[str] = []

        def slow() -> None:
            with httpx.Client(verify=certs.context(), timeout=TIMEOUT) as client:
                results.append(client.get(server.url + "/slow").text)

        thread = threading.Thread(target=slow)
        thread.start()
        server.stderr.wait_for("slow request started")
        server.signal(signal.SIGTERM)
        thread.join(TIMEOUT)
        assert results == ["/slow"]
        assert server.wait() == 0
    assert "INFO:     Waiting for connections to close. (CTRL+C to force quit)" in (
        server.stderr.lines
    )


def test_tls_over_a_unix_socket(certs, tmp_path) -> None:
    path = str(tmp_path / "tls.sock")
    args = ("--uds", path, "--ssl-certfile", certs.cert, "--ssl-keyfile", certs.key)
    with Fulmen("tests.apps:app", *args, "--lifespan", "off", wait_started=False) as server:
        server.stderr.wait_for(f"Fulmen running on https on unix socket {path} ")
        transport = httpx.HTTPTransport(uds=path, verify=certs.context())
        with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
            assert client.get("https://localhost/over-tls").text == "/over-tls"


# Errors


def _error_cases(certs: Certs) -> list[tuple[dict[str, Any], str]]:
    missing = str(Path(certs.cert).with_name("missing.pem"))
    key = {"ssl_certfile": certs.cert}
    return [
        ({"ssl_keyfile": certs.key}, "ssl_keyfile given without ssl_certfile"),
        (
            {"ssl_cert_reqs": 2, "ssl_ciphers": "x", "ssl_version": 5},
            "ssl_ciphers, ssl_version, ssl_cert_reqs given without ssl_certfile",
        ),
        ({"ssl_certfile": missing}, f"ssl_certfile {missing}: No such file or directory"),
        ({**key, "ssl_keyfile": missing}, f"ssl_keyfile {missing}: No such file or directory"),
        ({**key, "ssl_keyfile": certs.key, "ssl_ca_certs": missing}, f"ssl_ca_certs {missing}:"),
        (
            {**key, "ssl_keyfile": certs.encrypted_key},
            f"{certs.encrypted_key}: the private key is encrypted; give ssl_keyfile_password",
        ),
        (
            {**key, "ssl_keyfile": certs.encrypted_key, "ssl_keyfile_password": "wrong"},
            f"{certs.encrypted_key}: wrong ssl_keyfile_password",
        ),
        (
            {**key, "ssl_keyfile": certs.other_key},
            f"ssl_keyfile {certs.other_key} does not match the certificate in {certs.cert}",
        ),
        (key, f"ssl_certfile {certs.cert}: no PEM certificate and private key found"),
        (
            {"ssl_certfile": certs.junk, "ssl_keyfile": certs.key},
            f"ssl_certfile {certs.junk} / ssl_keyfile {certs.key}: not a PEM certificate",
        ),
        (
            {**key, "ssl_keyfile": certs.key, "ssl_ca_certs": certs.junk},
            f"ssl_ca_certs {certs.junk}: no PEM CA certificate found",
        ),
        ({**key, "ssl_keyfile": certs.key, "ssl_ciphers": "BOGUS"}, "selects no cipher"),
        ({**key, "ssl_version": 4}, "ssl_version 4 is not supported"),
        ({**key, "ssl_cert_reqs": 7}, "ssl_cert_reqs must be 0 (none), 1 (optional) or 2"),
        ({**key, "ssl_cert_reqs": 2}, "ssl_cert_reqs 1 or 2 needs ssl_ca_certs"),
    ]


def test_startup_errors_name_the_option_and_file(certs) -> None:
    for options, message in _error_cases(certs):
        with pytest.raises(TLSError) as caught:
            create_ssl_context(Config(scheme_app, **options))
        assert message in str(caught.value), options


def test_no_tls_without_a_certificate() -> None:
    assert create_ssl_context(Config(scheme_app)) is None
    with pytest.raises(ValueError, match="timeout_tls_handshake must be greater than 0"):
        Config(scheme_app, timeout_tls_handshake=0)


@pytest.mark.parametrize("password", [None, "wrong"])
def test_unusable_key_is_a_startup_failure(certs, password) -> None:
    args = ["--ssl-certfile", certs.cert, "--ssl-keyfile", certs.encrypted_key]
    if password is not None:
        args += ["--ssl-keyfile-password", password]
    # Never a pass phrase prompt, even with a terminal: an encrypted key without a password fails.
    result = run_fulmen("tests.apps:app", *args, "--lifespan", "off")
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    reason = "wrong ssl_keyfile_password" if password else "give ssl_keyfile_password"
    assert f"ERROR:    {certs.encrypted_key}: " in result.stderr
    assert reason in result.stderr
    assert "Fulmen running" not in result.stderr


# The ASGI `tls` scope extension


async def tls_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the scope's `tls` extension as JSON (`null` without one)."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(scope["extensions"].get("tls"))})
        await send({"type": "websocket.close"})
        return
    body = json.dumps(scope["extensions"].get("tls")).encode()
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body", "body": body})


def first_pem(path: str) -> str:
    text = Path(path).read_text()
    end = "-----END CERTIFICATE-----"
    return text[text.index("-----BEGIN CERTIFICATE-----") : text.index(end) + len(end)] + "\n"


def test_tls_extension_describes_the_connection(serve_tls, certs) -> None:
    with serve_tls(tls_app) as srv, httpx.Client(verify=certs.context(), timeout=TIMEOUT) as client:
        response = client.get(https(srv))
        tls = response.json()
    assert tls == {
        "server_cert": first_pem(certs.cert),
        "client_cert_chain": [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": 0x0304,
        "cipher_suite": tls["cipher_suite"],
    }
    assert tls["cipher_suite"] in (0x1301, 0x1302, 0x1303)  # the TLS 1.3 suites


def test_tls_extension_names_the_client_certificate(serve_tls, certs) -> None:
    options = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": certs.ca_file}
    with (
        serve_tls(tls_app, **options) as srv,
        httpx.Client(verify=certs.context(certs.client), timeout=TIMEOUT) as client,
    ):
        tls = client.get(https(srv)).json()
    leaf = certs.client.cert_chain_pems[0].bytes()
    assert tls["client_cert_chain"][0] == leaf.decode()
    subject = x509.load_pem_x509_certificate(leaf).subject
    assert tls["client_cert_name"] == subject.rfc4514_string()
    assert tls["client_cert_error"] is None


def test_tls_extension_on_http2_and_websockets_but_not_cleartext(serve_tls, certs) -> None:
    with serve_tls(tls_app) as srv:
        with httpx.Client(verify=certs.context(), http2=True, timeout=TIMEOUT) as client:
            response = client.get(https(srv))
        assert response.http_version == "HTTP/2"
        assert response.json()["tls_version"] == 0x0304
        url = f"wss://127.0.0.1:{srv.port}/"
        assert json.loads(wss_first_message(url, certs.context()))["tls_version"] == 0x0304
    with serve_tls(tls_app, ssl_certfile=None, ssl_keyfile=None) as srv:
        assert httpx.get(f"http://127.0.0.1:{srv.port}/", timeout=TIMEOUT).json() is None


def test_rfc4514_names() -> None:
    subject = ((("countryName", "FR"),), (("organizationName", "A, B"),), (("commonName", " x"),))
    assert dn_string({"subject": subject}) == "CN=\\ x,O=A\\, B,C=FR"
    assert dn_string({}) is None
