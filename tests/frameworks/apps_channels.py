"""A Channels project for tests/frameworks/test_channels.py: one `ProtocolTypeRouter` routing
HTTP to the Django app of apps_django.py and WebSockets to two echo consumers.

`/ws/sync` (a `WebsocketConsumer`) and `/ws/async` (an `AsyncWebsocketConsumer`) echo text
prefixed with the consumer's kind (`sync: hello`) and bytes unchanged; the text `close <code>`
makes them close the connection with that code. No channel layer.
"""

from __future__ import annotations

from channels.generic.websocket import AsyncWebsocketConsumer, WebsocketConsumer
from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path

from tests.frameworks.apps_django import asgi_app as django_asgi_app


class SyncEcho(WebsocketConsumer):
    def connect(self) -> None:
        self.accept()

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is not None and text_data.startswith("close "):
            self.close(code=int(text_data.split()[1]))
        elif text_data is not None:
            self.send(text_data=f"sync: {text_data}")
        else:
            self.send(bytes_data=bytes_data)


class AsyncEcho(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is not None and text_data.startswith("close "):
            await self.close(code=int(text_data.split()[1]))
        elif text_data is not None:
            await self.send(text_data=f"async: {text_data}")
        else:
            await self.send(bytes_data=bytes_data)


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [path("ws/sync", SyncEcho.as_asgi()), path("ws/async", AsyncEcho.as_asgi())]
        ),
    }
)
