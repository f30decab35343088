"""fulmen: a fast ASGI web server."""

from fulmen.config import Config
from fulmen.main import run
from fulmen.server import Server

__version__ = "0.1.0"
__all__ = ["Config", "Server", "__version__", "run"]
