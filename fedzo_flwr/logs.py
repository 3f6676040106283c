"""The one log prefix of fedzo-flwr: every line the library and the apps log starts with it.

The library logs through standard :mod:`logging` loggers named after their modules (so callers
can filter ``fedzo_flwr.*``); :func:`get_logger` wraps such a logger so that each message begins
with :data:`PREFIX`. The Flower apps log through Flower's logger with the same prefix
(``server_app.logs.log``).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

#: What every fedzo-flwr log line starts with.
PREFIX = "[fedzo]"


class PrefixedLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose messages start with :data:`PREFIX`."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        """Prepend the prefix to ``msg``."""
        return f"{PREFIX} {msg}", kwargs


def get_logger(name: str) -> PrefixedLogger:
    """``logging.getLogger(name)``, with every message prefixed by :data:`PREFIX`."""
    return PrefixedLogger(logging.getLogger(name), {})
