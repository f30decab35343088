"""The ASGI `tls` scope extension (spec 0.2): what the TLS handshake of a connection agreed on,
computed once per connection and shared by every request (and WebSocket) it carries.

`server_cert` is the PEM of the certificate fulmen presents (the first of `--ssl-certfile`),
read once at startup. `client_cert_chain` holds the client's certificate (and, where Python
exposes it, its verified chain), `client_cert_name` its subject as an RFC 4514 string.
`client_cert_error` is always None: a client certificate that fails verification fails the
handshake, so no request ever comes with one. `tls_version` and `cipher_suite` are the IANA
numbers (0x0304 for TLS 1.3, 0x1302 for TLS_AES_256_GCM_SHA384).
"""

from __future__ import annotations

import re
import ssl
from typing import Any

_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.DOTALL)
_suites: dict[str, int] = {}  # OpenSSL cipher name -> IANA number, filled from the context
# RFC 4514 §2.3: the short names of the attribute types a DN string uses.
_SHORT_NAMES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def server_cert(certfile: str | None) -> str | None:
    """The PEM of the first certificate in `certfile` (the server's own), None without TLS."""
    if certfile is None:
        return None
    with open(certfile, "rb") as file:
        found = _PEM.search(file.read())
    return found.group(0).decode("ascii").strip() + "\n" if found else None


def tls_extension(ssl_object: ssl.SSLObject, server_pem: str | None) -> dict[str, Any]:
    """The `tls` extension of a connection whose handshake is done."""
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name = None
    if der:
        chain = _chain(ssl_object) or [ssl.DER_cert_to_PEM_cert(der)]
        name = dn_string(ssl_object.getpeercert() or {})
    cipher = ssl_object.cipher()
    return {
        "server_cert": server_pem,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _suite(ssl_object, cipher[0]) if cipher else None,
    }


def _chain(ssl_object: ssl.SSLObject) -> list[str]:
    """The client's verified chain, leaf first (Python 3.13 and later), else empty."""
    verified = getattr(ssl_object, "get_verified_chain", None)
    if verified is None:
        return []
    return [ssl.DER_cert_to_PEM_cert(der) for der in verified()]  # DER, leaf first


def _suite(ssl_object: ssl.SSLObject, name: str) -> int | None:
    number = _suites.get(name)
    if number is None:
        for entry in ssl_object.context.get_ciphers():
            _suites[entry["name"]] = entry["id"] & 0xFFFF
        number = _suites.get(name)
    return number


def dn_string(peercert: dict[str, Any]) -> str | None:
    """RFC 4514: the subject of `ssl.getpeercert()`, most specific attribute first."""
    subject = peercert.get("subject")
    if not subject:
        return None
    parts = []
    for rdn in reversed(subject):
        parts.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    """RFC 4514 §2.4: the characters a value must escape."""
    escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if escaped[:1] in ("#", " "):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped
