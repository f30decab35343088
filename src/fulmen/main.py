"""`fulmen.run()`: the Python entry point behind the CLI."""

from __future__ import annotations

import logging
import sys
from typing import Any

from fulmen.config import Config
from fulmen.importer import ImportFromStringError
from fulmen.server import Server
from fulmen.supervisors.multiprocess import Multiprocess
from fulmen.supervisors.reload import ChangeReload

logger = logging.getLogger("fulmen.error")

STARTUP_FAILURE = 3


def run(app: Any, **options: Any) -> None:
    """Serve `app` (an ASGI/WSGI callable or a "module:attribute" string) until stopped.

    Options are `Config`'s, with uvicorn's names. Exits with status 1 when the app cannot be
    loaded and 3 when it fails to start (lifespan startup failed, socket could not be bound).
    """
    config = Config(app, **options)
    if config.reload:
        code = ChangeReload(config).run()
        if code:
            sys.exit(code)
        return
    if config.workers is not None and config.workers > 1:
        code = Multiprocess(config).run()
        if code:
            sys.exit(code)
        return
    server = Server(config)
    try:
        server.run()
    except ImportFromStringError as exc:
        logger.error("Error loading ASGI app. %s", exc)
        sys.exit(1)
    except KeyboardInterrupt:  # pragma: no cover - a signal before handlers were installed
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)
