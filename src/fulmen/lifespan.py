"""The ASGI lifespan protocol: startup before serving, shutdown after the last request."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fulmen.types import ASGIApp, Message

logger = logging.getLogger("fulmen.error")


class Lifespan:
    """Runs the app's lifespan scope for `--lifespan auto|on` (`off` never creates one).

    In `auto` mode an app that raises before answering startup is taken not to support
    lifespan, and serving goes on; in `on` mode that is a startup failure.
    """

    def __init__(self, app: ASGIApp, mode: str, state: dict[str, Any]) -> None:
        self.app = app
        self.mode = mode
        self.state = state
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.startup_event = asyncio.Event()
        self.shutdown_event = asyncio.Event()
        self.startup_failed = False
        self.shutdown_failed = False
        self.unsupported = False
        self.error: str | None = None
        self.abandoned = False
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        logger.info("Waiting for application startup.")
        self.task = asyncio.get_running_loop().create_task(self._main())
        await self.messages.put({"type": "lifespan.startup"})
        await self.startup_event.wait()
        if self.startup_failed or (self.error and self.mode == "on"):
            logger.error("Application startup failed. Exiting.")
            self.startup_failed = True
        elif not self.unsupported:
            logger.info("Application startup complete.")

    async def shutdown(self, timeout: float | None = None) -> None:
        """Ask the app to shut down and wait for its answer, at most `timeout` seconds (None:
        no limit); past it, the lifespan task is cancelled."""
        task = self.task
        if self.unsupported or task is None or task.done():
            return
        logger.info("Waiting for application shutdown.")
        await self.messages.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self.shutdown_event.wait(), timeout)
        except asyncio.TimeoutError:
            logger.error("Application shutdown did not complete within %s seconds.", timeout)
            self.abandon()
            return
        if self.abandoned:
            logger.warning("Application shutdown abandoned.")
        elif self.shutdown_failed or (self.error and self.mode == "on"):
            logger.error("Application shutdown failed. Exiting.")
        else:
            logger.info("Application shutdown complete.")

    def abandon(self) -> None:
        """Stop waiting for the app's shutdown (a further SIGINT, or the timeout): its task is
        cancelled, without a traceback."""
        self.abandoned = True
        if self.task is not None:
            self.task.cancel()
        self.shutdown_event.set()

    async def _main(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self.receive, self.send)
        except asyncio.CancelledError:
            pass  # abandoned (`abandon`), or the loop is ending: not an error of the app's
        except BaseException as exc:
            self.error = str(exc)
            if self.startup_failed or self.shutdown_failed:
                pass  # already reported through the failed message
            elif self.mode == "auto" and not self.startup_event.is_set():
                self.unsupported = True
                logger.info("ASGI 'lifespan' protocol appears unsupported.")
            else:
                logger.error("Exception in 'lifespan' protocol", exc_info=exc)
        finally:
            self.startup_event.set()
            self.shutdown_event.set()

    async def receive(self) -> Message:
        return await self.messages.get()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind not in _OUTCOMES:
            raise RuntimeError(f"Unexpected lifespan message {kind!r}")
        phase, failed = _OUTCOMES[kind]
        if failed:
            setattr(self, f"{phase}_failed", True)
            if message.get("message"):
                logger.error(message["message"])
        event: asyncio.Event = getattr(self, f"{phase}_event")
        event.set()


# message type -> (phase, failed)
_OUTCOMES = {
    "lifespan.startup.complete": ("startup", False),
    "lifespan.startup.failed": ("startup", True),
    "lifespan.shutdown.complete": ("shutdown", False),
    "lifespan.shutdown.failed": ("shutdown", True),
}
