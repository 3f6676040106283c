"""Log lines of the ServerApp: Flower's logger, with the library's prefix (``[fedzo]``)."""

from __future__ import annotations

from flwr.common.logger import log as flower_log

from fedzo_flwr.logs import PREFIX


def log(level: int, msg: str, *args: object) -> None:
    """Log ``msg % args`` at ``level`` on Flower's logger, prefixed with ``[fedzo]``."""
    flower_log(level, f"{PREFIX} {msg}", *args)
