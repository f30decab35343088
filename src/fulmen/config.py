"""Configuration: every option is defined once, here, as a field of `Config`.

The click command (`cli.py`), the `FULMEN_*` environment variables, `fulmen.run(**kwargs)` and
`Config(...)` are all generated from these fields. No IO happens in this module except
`Config.load()`, which imports the application.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fulmen.access import AccessFormat
from fulmen.addresses import check_binding, parse_address
from fulmen.configfile import load_env_file, read_config_file
from fulmen.options import check_names, option
from fulmen.protocols.engines import engine_name
from fulmen.types import ASGIApp

LOOP_CHOICES = ("auto", "asyncio", "uvloop")
HTTP_CHOICES = ("auto", "h11", "httptools")
# 'websockets-sansio' is uvicorn's name for the engine fulmen's 'websockets' already is.
WS_CHOICES = ("auto", "none", "websockets", "websockets-sansio", "wsproto")
LIFESPAN_CHOICES = ("auto", "on", "off")
INTERFACE_CHOICES = ("auto", "asgi3", "asgi2", "wsgi", "consumer")
LOG_LEVEL_CHOICES = ("critical", "error", "warning", "info", "debug", "trace")
LOG_FORMATS = ("text", "json")


@dataclass(kw_only=True)
class Config:
    """Server settings. `Config(app, **options)`; option names mirror uvicorn's."""

    app: ASGIApp | Callable[..., Any] | str = field(kw_only=False)
    host: str = option("127.0.0.1", "Bind socket to this host.")
    port: int = option(8000, "Bind socket to this port. 0 picks a free port.")
    uds: str | None = option(None, "Bind to a UNIX domain socket.", kind=str)
    fd: int | None = option(None, "Bind to socket from this file descriptor.", kind=int)
    bind: list[str] = option(
        None,
        "Listen on ADDRESS: HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N. Repeatable; "
        "replaces --host, --port, --uds and --fd.",
        flag="--bind",
        multiple=True,
        metavar="ADDRESS",
    )
    reuse_port: bool = option(
        False, "Set SO_REUSEPORT, so that several processes can bind the same port."
    )
    ssl_keyfile: str | None = option(None, "TLS private key file (PEM).", kind=str)
    ssl_certfile: str | None = option(
        None, "TLS certificate (chain) file (PEM). Turns TLS on.", kind=str
    )
    ssl_keyfile_password: str | None = option(
        None, "Password of an encrypted --ssl-keyfile.", kind=str
    )
    ssl_version: int = option(
        int(ssl.PROTOCOL_TLS_SERVER),
        "ssl.PROTOCOL_* constant. The default negotiates TLS 1.2 or 1.3; 5 (TLSv1_2) pins 1.2.",
    )
    ssl_cert_reqs: int = option(
        int(ssl.CERT_NONE),
        "Client certificates: 0 not asked for, 1 optional, 2 required (ssl.CERT_*).",
    )
    ssl_ca_certs: str | None = option(
        None, "CA certificates file (PEM) that client certificates are verified against.", kind=str
    )
    ssl_ciphers: str | None = option(
        None, "OpenSSL cipher list for TLS 1.2. Default: Python's secure list.", kind=str
    )
    timeout_tls_handshake: float = option(
        10.0, "Close connections whose TLS handshake is not complete after this many seconds."
    )
    loop: str = option("auto", "Event loop implementation.", choices=LOOP_CHOICES)
    http: str = option("auto", "HTTP/1.1 parser implementation.", choices=HTTP_CHOICES)
    http2: bool = option(
        True,
        "Serve HTTP/2: ALPN h2 over TLS, h2c with prior knowledge or Upgrade on plain HTTP.",
        flag="--http2/--no-http2",
    )
    h2_max_concurrent_streams: int = option(
        100, "Most HTTP/2 (and HTTP/3) streams a client may have open at once on one connection."
    )
    http3: bool = option(
        False,
        "Serve HTTP/3 over QUIC on the TLS port (UDP), advertised with Alt-Svc. Needs TLS "
        "(a certificate file) and the 'http3' extra (aioquic).",
        flag="--http3/--no-http3",
    )
    http3_retry: bool = option(
        True,
        "Validate HTTP/3 client addresses with a QUIC Retry before any handshake work "
        "(against spoofed addresses and amplification).",
        flag="--http3-retry/--no-http3-retry",
    )
    ws: str = option(
        "auto",
        "WebSocket engine. 'auto': websockets, else wsproto, else none (upgrades are plain HTTP).",
        choices=WS_CHOICES,
    )
    ws_max_size: int = option(16777216, "Largest WebSocket message in bytes (after inflating).")
    ws_max_queue: int = option(
        32, "Received WebSocket messages buffered for the app before reading pauses."
    )
    ws_ping_interval: float | None = option(
        20.0, "Seconds between WebSocket pings. 0 or unset: no pings.", kind=float
    )
    ws_ping_timeout: float | None = option(
        20.0, "Close a WebSocket whose pong is this many seconds late.", kind=float
    )
    ws_per_message_deflate: bool = option(
        True, "Offer WebSocket per-message-deflate compression (true/false).", kind=bool
    )
    lifespan: str = option("auto", "Lifespan implementation.", choices=LIFESPAN_CHOICES)
    interface: str = option(
        "auto",
        "Application interface. 'auto' tells ASGI3, ASGI2 and async two-argument consumers "
        "apart; WSGI and sync consumers must be asked for.",
        choices=INTERFACE_CHOICES,
    )
    workers: int | None = option(
        None,
        "Number of worker processes. Default: $WEB_CONCURRENCY, else 1 (no supervisor).",
        kind=int,
    )
    timeout_worker_healthcheck: float = option(
        5.0, "Kill and replace a worker whose event loop has not answered a ping in this long."
    )
    limit_max_requests_jitter: int = option(
        0, "Add a random 0 to N to each worker's --limit-max-requests, to stagger restarts."
    )
    root_path: str = option("", "ASGI 'root_path' for applications mounted below a prefix.")
    limit_concurrency: int | None = option(
        None, "Answer 503 beyond this many concurrent connections or requests.", kind=int
    )
    limit_max_requests: int | None = option(
        None, "Exit gracefully after serving this many requests.", kind=int
    )
    backlog: int = option(2048, "Maximum number of connections waiting to be accepted.")
    timeout_keep_alive: float = option(
        5.0, "Close keep-alive connections idle for this many seconds."
    )
    timeout_request_header: float = option(
        10.0, "Close connections whose request head is not complete after this many seconds."
    )
    timeout_request_body: float = option(
        30.0,
        "Seconds the app may wait in receive() for body bytes that do not come (or come slower "
        "than 500 bytes/s past that grace) before the request ends with 408. 0: no limit.",
    )
    timeout_send: float = option(
        30.0,
        "Close a connection whose client has read nothing of the response for this many "
        "seconds, its write buffer full. 0: no limit.",
    )
    timeout_graceful_shutdown: float | None = option(
        30.0,
        "Seconds to let in-flight requests finish on shutdown before cancelling them.",
        kind=float,
    )
    limit_request_line: int = option(
        8192, "Largest request line (method, target, version) in bytes; longer gets 414."
    )
    limit_request_body: int | None = option(
        None, "Largest request body in bytes; larger gets 413. Default: no limit.", kind=int
    )
    h11_max_incomplete_event_size: int = option(
        16384, "Largest request head (line and headers) in bytes, for both parsers; 431 above."
    )
    headers: list[str] = option(
        None,
        "Extra default response header, as 'Name: value'. Repeatable.",
        flag="--header",
        multiple=True,
        metavar="NAME:VALUE",
    )
    server_header: bool = option(
        True, "Send a 'server: fulmen' header.", flag="--server-header/--no-server-header"
    )
    date_header: bool = option(True, "Send a 'date' header.", flag="--date-header/--no-date-header")
    log_level: str = option("info", "Log level.", choices=LOG_LEVEL_CHOICES)
    log_config: str | dict[str, Any] | Any | None = option(
        None,
        "Logging configuration applied after fulmen's: a .json, .yaml or .yml file "
        "(dictConfig) or an .ini/.conf file (fileConfig).",
        kind=str,
        metavar="PATH",
    )
    log_format: str = option(
        "text", "Log line format: 'json' writes one JSON object per line.", choices=LOG_FORMATS
    )
    access_log_format: str | None = option(
        None,
        "Access line format with %(atom)s fields, e.g. '%(client)s %(method)s %(path)s "
        "%(status)d %(duration_ms).1f'. Default: the standard line.",
        kind=str,
        metavar="FORMAT",
    )
    access_log: bool = option(True, "Log each request.", flag="--access-log/--no-access-log")
    metrics_bind: str | None = option(
        None,
        "Serve Prometheus metrics at http://HOST:PORT/metrics (a second listener; with "
        "--workers N, the supervisor serves the sum over the workers).",
        kind=str,
        metavar="HOST:PORT",
    )
    use_colors: bool | None = option(
        None, "Colour the logs (default: when a TTY).", flag="--use-colors/--no-use-colors"
    )
    proxy_headers: bool = option(
        True,
        "Trust X-Forwarded-For/Proto from --forwarded-allow-ips for client and scheme.",
        flag="--proxy-headers/--no-proxy-headers",
    )
    proxy_protocol: bool = option(
        False,
        "Expect a PROXY protocol v1/v2 header on every connection, from --forwarded-allow-ips "
        "only. Only behind a balancer that always sends it.",
    )
    forwarded_allow_ips: str | None = option(
        None,
        "Comma-separated IPs or CIDRs (or '*') trusted for proxy headers. "
        "Default: $FORWARDED_ALLOW_IPS or 127.0.0.1.",
        kind=str,
    )
    proxy_headers_mode: str = option(
        "x-forwarded",
        "Which proxy headers to read: 'x-forwarded' (X-Forwarded-*) or 'forwarded' (RFC 7239 "
        "Forwarded). The other family is ignored.",
        choices=("x-forwarded", "forwarded"),
    )
    proxy_headers_host: bool = option(
        False,
        "Also take the host and port (X-Forwarded-Host/Port, or Forwarded host=) into "
        "scope['server'] and the Host header.",
        flag="--proxy-headers-host/--no-proxy-headers-host",
    )
    config: str | None = option(
        None,
        "TOML file of options, named as here (port = 8001). The command line and FULMEN_* "
        "variables win over it.",
        kind=str,
        metavar="PATH",
    )
    env_file: str | None = option(
        None, "Load this dotenv file into the environment before importing APP.", kind=str
    )
    factory: bool = option(False, "Treat APP as a factory: call it to get the application.")
    app_dir: str = option(".", "Prepended to sys.path to import APP.")
    reload: bool = option(False, "Restart the server when files change. For development only.")
    reload_dirs: list[str] = option(
        None,
        "Directory watched by --reload. Repeatable. Default: the current directory and the "
        "application's directory.",
        flag="--reload-dir",
        multiple=True,
        metavar="DIR",
    )
    reload_includes: list[str] = option(
        None,
        "Glob pattern of files whose change reloads. Repeatable. Default: '*.py'.",
        flag="--reload-include",
        multiple=True,
        metavar="GLOB",
    )
    reload_excludes: list[str] = option(
        None,
        "Glob pattern (or directory) of files whose change does not reload. Repeatable. "
        "Default: '.*', '.py[cod]', '.sw.*', '~*'.",
        flag="--reload-exclude",
        multiple=True,
        metavar="GLOB",
    )
    reload_delay: float = option(
        0.25, "Seconds to gather further changes before reloading: one restart for them all."
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, not {value!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, not {self.port}")
        engine_name(self.ws)  # an engine asked for by name must be installed
        if self.h2_max_concurrent_streams < 1:
            raise ValueError("h2_max_concurrent_streams must be at least 1")
        if self.ws_max_size < 1 or self.ws_max_queue < 1:
            raise ValueError("ws_max_size and ws_max_queue must be at least 1")
        self.header_pairs()  # a malformed --header is a configuration error, not a crash later
        if self.access_log_format is not None:
            AccessFormat(self.access_log_format)  # an unknown atom is a configuration error
        check_binding(self)  # TLS files and combinations are checked at startup (tls.py)
        if self.timeout_request_body < 0 or self.timeout_send < 0:
            raise ValueError("timeout_request_body and timeout_send must not be negative")
        if self.timeout_tls_handshake <= 0:
            raise ValueError("timeout_tls_handshake must be greater than 0")
        if self.env_file is not None:  # first, as uvicorn: it may set the variables below
            load_env_file(self.env_file)  # (the IO lives in configfile)
        if self.forwarded_allow_ips is None:
            self.forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
        self._check_reload()
        self._check_processes()

    def _check_reload(self) -> None:
        for name in ("reload_dirs", "reload_includes", "reload_excludes"):
            value = getattr(self, name)  # one string is one value, as uvicorn's reload_dirs="src"
            setattr(self, name, [value] if isinstance(value, str) else list(value))
        if self.reload_delay < 0:
            raise ValueError("reload_delay must not be negative")
        if not self.reload:
            return
        if self.workers is not None and self.workers > 1:
            raise ValueError(
                f"--reload and --workers {self.workers} cannot be used together: "
                "reloading runs one server process"
            )
        self.workers = 1  # one server process: $WEB_CONCURRENCY does not apply
        if not isinstance(self.app, str):
            raise ValueError(
                "--reload needs the application as an import string ('module:attribute'), "
                "not an object: the server process imports it anew on each change"
            )

    def _check_processes(self) -> None:
        if self.workers is None:  # as uvicorn: the variable only when the option is not given
            raw = os.environ.get("WEB_CONCURRENCY", "").strip()
            try:
                self.workers = int(raw) if raw else 1
            except ValueError:
                raise ValueError(f"WEB_CONCURRENCY must be an integer, not {raw!r}") from None
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.timeout_worker_healthcheck <= 0:
            raise ValueError("timeout_worker_healthcheck must be greater than 0")
        if self.limit_max_requests_jitter < 0:
            raise ValueError("limit_max_requests_jitter must not be negative")
        if self.metrics_bind is not None:
            parse_address(self.metrics_bind)

    @property
    def use_http2(self) -> bool:
        """Whether HTTP/2 is served (`--http2`, on by default; it needs no extra library)."""
        return self.http2

    @property
    def trusted_hosts(self) -> list[str]:
        """`forwarded_allow_ips` as a list of stripped entries."""
        raw = self.forwarded_allow_ips or ""
        return [item.strip() for item in raw.split(",") if item.strip()]

    def header_pairs(self) -> list[tuple[str, str]]:
        """`--header` values as (name, value) pairs; each must contain a colon."""
        pairs = []
        for item in self.headers:
            name, sep, value = item.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"--header must be 'Name: value', not {item!r}")
            pairs.append((name.strip(), value.strip()))
        return pairs


OPTION_FIELDS = tuple(f for f in dataclasses.fields(Config) if f.name != "app")
OPTION_NAMES = frozenset(f.name for f in OPTION_FIELDS)


def check_options(options: dict[str, Any]) -> None:
    """Reject unknown option names, suggesting the nearest known one."""
    check_names(options, OPTION_NAMES)


def _checked(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: Config, app: Any, **options: Any) -> None:
        check_options(options)
        if options.get("config") is not None:  # keyword arguments win over the file's options
            from_file = read_config_file(options["config"], OPTION_FIELDS)
            from_file.pop("app", None)  # the `app` argument is always given in Python
            options = {**from_file, **options}
        init(self, app, **options)

    return __init__


# Wrap the generated __init__ so a typo gets a suggestion instead of a bare TypeError.
setattr(Config, "__init__", _checked(Config.__init__))  # noqa: B010
