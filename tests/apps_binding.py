"""Apps for the binding and TLS subprocess tests: `python -m fulmen tests.apps_binding:NAME`."""

from __future__ import annotations

import os
from typing import Any

from tests.apps import app as path_app


async def environment(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the systemd activation variables fulmen left in its environment."""
    if scope["type"] != "http":
        await path_app(scope, receive, send)
        return
    names = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    body = ",".join(f"{name}={os.environ.get(name, '-')}" for name in names)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": f"{scope['scheme']} {body}".encode()})
