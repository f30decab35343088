"""TLS: the server's one `ssl.SSLContext`, built at startup from the `ssl_*` options.

The options keep uvicorn's names and types; the defaults are secure rather than uvicorn's:
TLS 1.2 at least, Python's cipher list (forward secrecy and AEAD only, no SHA-1) instead of
OpenSSL's `TLSv1` group, no renegotiation, and ALPN announcing `h2` (with HTTP/2 on) and `http/1.1`.
"""

from __future__ import annotations

import importlib.util
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fulmen.config import Config

# `ssl_version` takes the ssl.PROTOCOL_* constants uvicorn passes to ssl.SSLContext(). Fulmen
# always builds a PROTOCOL_TLS_SERVER context (the others are deprecated since Python 3.10) and
# turns the constant into a version range. TLS 1.0 and 1.1 are refused (RFC 8996).
_TLS = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED)
VERSIONS: dict[int, tuple[ssl.TLSVersion, ssl.TLSVersion]] = {
    int(ssl.PROTOCOL_TLS_SERVER): _TLS,
    int(ssl.PROTOCOL_TLS): _TLS,
    int(ssl.PROTOCOL_TLSv1_2): (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2),
}
CERT_REQS = (int(ssl.CERT_NONE), int(ssl.CERT_OPTIONAL), int(ssl.CERT_REQUIRED))
# The server's preference, first: h2 when HTTP/2 is on. A client offering none of them gets no
# protocol selected (OpenSSL goes on without ALPN rather than failing the handshake, RFC 7301
# §3.2), and is served HTTP/1.1.
ALPN_PROTOCOLS = ["http/1.1"]
ALPN_WITH_H2 = ["h2", "http/1.1"]
_NEED_CERTFILE = ("ssl_keyfile", "ssl_keyfile_password", "ssl_ca_certs", "ssl_ciphers")


class TLSError(OSError):
    """TLS options, or a certificate, key or CA file, that cannot be used: no startup."""


def check_tls_options(config: Config) -> None:
    """Reject values and combinations that cannot work, before any file is read."""
    if config.ssl_certfile is None:
        given = [name for name in _NEED_CERTFILE if getattr(config, name) is not None]
        if config.ssl_version != ssl.PROTOCOL_TLS_SERVER:
            given.append("ssl_version")
        if config.ssl_cert_reqs != ssl.CERT_NONE:
            given.append("ssl_cert_reqs")
        if config.http3:  # QUIC is always encrypted
            given.append("http3")
        if given:  # never serve plain HTTP to someone who asked for TLS
            raise TLSError(f"{', '.join(given)} given without ssl_certfile")
        return
    if config.ssl_version not in VERSIONS:
        accepted = ", ".join(str(v) for v in VERSIONS)
        raise TLSError(
            f"ssl_version {config.ssl_version} is not supported: use {accepted} "
            "(ssl.PROTOCOL_TLS_SERVER, PROTOCOL_TLS, PROTOCOL_TLSv1_2); TLS 1.0/1.1 are refused"
        )
    if config.ssl_cert_reqs not in CERT_REQS:
        raise TLSError(
            f"ssl_cert_reqs must be 0 (none), 1 (optional) or 2 (required), "
            f"not {config.ssl_cert_reqs}"
        )
    if config.ssl_cert_reqs != ssl.CERT_NONE and config.ssl_ca_certs is None:
        raise TLSError("ssl_cert_reqs 1 or 2 needs ssl_ca_certs to verify client certificates")
    if config.http3:
        _check_http3(config)


def _check_http3(config: Config) -> None:
    if config.ssl_cert_reqs == ssl.CERT_REQUIRED:
        # QUIC connections are not asked for client certificates: HTTP/3 would let clients
        # without one in.
        raise TLSError("http3 cannot be used with ssl_cert_reqs 2 (client certificates)")
    if importlib.util.find_spec("aioquic") is None:
        raise TLSError("http3 needs aioquic: pip install 'fulmen[http3]'")


def create_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server's SSLContext, or None without `ssl_certfile` (plain HTTP).

    Raises `TLSError` (the server cannot start: exit status 3) with a message naming the option
    and file when options do not go together, a file cannot be read or holds no usable
    certificate or key, or the key's password is missing or wrong. These checks run at startup
    rather than in `Config`, where each option must be valid on its own.
    """
    check_tls_options(config)
    certfile = config.ssl_certfile
    if certfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version, context.maximum_version = VERSIONS[config.ssl_version]
    # Client-initiated renegotiation costs the server a handshake per request (a DoS lever).
    context.options |= ssl.OP_NO_RENEGOTIATION
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
        _check_readable(name, getattr(config, name))
    _load_chain(context, certfile, config.ssl_keyfile, config.ssl_keyfile_password)
    context.verify_mode = ssl.VerifyMode(config.ssl_cert_reqs)
    if config.ssl_ca_certs is not None:
        try:
            context.load_verify_locations(cafile=config.ssl_ca_certs)
        except ssl.SSLError as exc:
            raise TLSError(
                f"ssl_ca_certs {config.ssl_ca_certs}: no PEM CA certificate found ({exc.reason})"
            ) from None
    if config.ssl_ciphers is not None:
        try:
            context.set_ciphers(config.ssl_ciphers)
        except ssl.SSLError:
            raise TLSError(f"ssl_ciphers {config.ssl_ciphers!r} selects no cipher") from None
    context.set_alpn_protocols(ALPN_WITH_H2 if config.use_http2 else ALPN_PROTOCOLS)
    return context


def _check_readable(name: str, path: str | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TLSError(f"{name} {path}: {exc.strerror}") from None


def _load_chain(
    context: ssl.SSLContext, certfile: str, keyfile: str | None, password: str | None
) -> None:
    asked = False

    def get_password() -> str:
        # OpenSSL asks only for an encrypted key. Without a password it would prompt on the
        # terminal, which a server must never do.
        nonlocal asked
        asked = True
        if password is None:
            raise TLSError(
                f"{keyfile or certfile}: the private key is encrypted; give ssl_keyfile_password"
            )
        return password

    try:
        context.load_cert_chain(certfile, keyfile, get_password)
    except TLSError:
        raise
    except ssl.SSLError as exc:
        if asked:
            message = f"{keyfile or certfile}: wrong ssl_keyfile_password"
        elif exc.reason == "KEY_VALUES_MISMATCH":
            message = f"ssl_keyfile {keyfile} does not match the certificate in {certfile}"
        elif keyfile is None:
            message = (
                f"ssl_certfile {certfile}: no PEM certificate and private key found "
                "(give the key with ssl_keyfile if it is in a separate file)"
            )
        else:
            message = f"ssl_certfile {certfile} / ssl_keyfile {keyfile}: not a PEM certificate "
            message += "and private key"
        raise TLSError(message) from None
