"""Headless Chromium for the browser tests: where it is, the flags it needs here, and bounded runs.

Two ways to run it, both in a fresh profile that is removed afterwards, both in a session of
its own so that stopping it (by its process group, whose id is the browser's PID) also stops
its renderer and helper processes:

- `browser(url, *flags)`: a context manager; Chromium shows `url` until the block ends (the
  test waits, bounded, for what the server sees). This is what `test_browser.py` does.
- `dump_dom(url, *flags)`: one run of `--dump-dom`, returning the page's DOM once the page has
  settled (`--virtual-time-budget`) and Chromium has exited, or raising `TimeoutError`.

HTTP/3 (`http3_flags`), as found with Chromium 156 against a server on 127.0.0.1 whose
certificate comes from a test CA (trustme):

- QUIC verifies certificates strictly: `--ignore-certificate-errors` does not help (the QUIC
  handshake fails with CERTIFICATE_VERIFY_FAILED), and a certificate from a root that is not a
  public one is refused unless its host is named in `--origin-to-force-quic-on` (any port).
  `--ignore-certificate-errors-spki-list=<spki_hash(cert)>` makes the certificate verify, on
  TCP and QUIC alike.
- `force=True`: `--origin-to-force-quic-on=HOST:PORT`, every request to the origin goes over
  QUIC from the first (no TCP at all, no fallback: a server without QUIC gives
  ERR_QUIC_PROTOCOL_ERROR).
- `force=False`, the Alt-Svc path: QUIC is forced on another port of the same host only to
  allow its certificate; the first request goes over TCP (TLS, h2), its `Alt-Svc: h3=":PORT"`
  is remembered, and a later request of the same page (usually the next one) goes over h3.
- `--disable-quic` (in `test_browser.py`'s flags) turns all of this off, forced QUIC included.
- "localhost" resolves to ::1 first in Chromium (whatever /etc/hosts says): QUIC to a server
  listening on 127.0.0.1 only fails there (ERR_QUIC_HANDSHAKE_FAILED), hence the
  `--host-resolver-rules` in `FLAGS`, which also keep every other name from resolving.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import TIMEOUT


def _chromium() -> str | None:
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


CHROMIUM = _chromium()

# As root Chromium needs --no-sandbox. The network here is closed, so nothing may reach out:
# only loopback resolves ("localhost" to 127.0.0.1, see above); background services are off.
# No --disable-quic here: add it for tests that must not use HTTP/3.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP localhost 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def spki_hash(cert_pem: bytes) -> str:
    """Base64 of the SHA-256 of the (first) certificate's SubjectPublicKeyInfo, the form
    `--ignore-certificate-errors-spki-list` takes (comma-separated, for several)."""
    cert = x509.load_pem_x509_certificate(cert_pem)  # the first of a chain: the leaf
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def http3_flags(host: str, port: int, cert_pem: bytes, *, force: bool = True) -> list[str]:
    """Flags for HTTP/3 to https://HOST:PORT/ whose certificate (chain) is `cert_pem`.

    `force=True`: QUIC from the first request. `force=False`: only via the server's Alt-Svc
    (the first request goes over TCP; QUIC is forced on another port of the host, which only
    lets QUIC accept its certificate).
    """
    other = 9 if port != 9 else 7  # discard/echo: nothing is ever asked of it
    return [
        f"--origin-to-force-quic-on={host}:{port if force else other}",
        f"--ignore-certificate-errors-spki-list={spki_hash(cert_pem)}",
    ]


@contextlib.contextmanager
def profile() -> Iterator[str]:
    """A fresh user-data-dir, removed afterwards."""
    path = tempfile.mkdtemp(prefix="fulmen-chromium-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start(
    url: str, flags: tuple[str, ...], user_data: str, out: IO[bytes], err: IO[bytes]
) -> subprocess.Popen[bytes]:
    assert CHROMIUM is not None, "Chromium is not installed"
    # Its own session, so stopping it stops the renderer and helper processes too.
    return subprocess.Popen(
        [CHROMIUM, *FLAGS, *flags, f"--user-data-dir={user_data}", url],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,
    )


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its PID stays its group's id)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop the browser's process group: SIGTERM, then SIGKILL after `timeout`, then reap.

    Call before the leader is reaped, so that the group id is still the browser's PID.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _read(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


@contextlib.contextmanager
def browser(url: str, *flags: str, timeout: float = TIMEOUT) -> Iterator[Callable[[], str]]:
    """Headless Chromium showing `url` until the block ends, in a fresh profile.

    Yields a function returning what Chromium wrote so far (for failure messages).
    """
    with profile() as user_data, tempfile.TemporaryFile() as log:
        proc = _start(url, flags, user_data, log, log)
        try:
            yield lambda: _read(log)
        finally:
            _stop(proc, timeout)


@dataclass
class Dump:
    dom: str  # the page's DOM as HTML (empty if the page did not load)
    log: str  # what Chromium wrote to stderr (page load errors show up here)


def dump_dom(url: str, *flags: str, budget_ms: int = 5000, timeout: float = TIMEOUT) -> Dump:
    """Load `url` in a fresh headless Chromium and return its DOM once the page has settled.

    `--virtual-time-budget=budget_ms` lets the page's timers and fetches run (virtual time
    runs fast while the page waits on nothing) before the DOM is dumped. Raises
    `TimeoutError` (with Chromium's output) if Chromium has not exited within `timeout`.
    """
    budget = [f"--virtual-time-budget={budget_ms}"] if budget_ms > 0 else []
    with (
        profile() as user_data,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        proc = _start(url, (*flags, *budget, "--dump-dom"), user_data, out, err)
        deadline = time.monotonic() + timeout
        try:
            while not _exited(proc.pid):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Chromium ran over {timeout}s:\n{_read(err)}")
                time.sleep(0.05)
        finally:
            _stop(proc, timeout)  # also whatever it left behind in its group
        return Dump(dom=_read(out), log=_read(err))
