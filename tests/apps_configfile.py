"""Apps for the configuration-file tests: `python -m fulmen tests.apps_configfile:NAME`."""

from __future__ import annotations

import os
from typing import Any


async def environ(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the environment variable named by the request path (`/NAME`), or '-'."""
    assert scope["type"] == "http"  # run with --lifespan off
    body = os.environ.get(scope["path"].lstrip("/"), "-")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body.encode()})
