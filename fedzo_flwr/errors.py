"""The library's exceptions: one hierarchy, rooted in :class:`FedZOError`.

Catch :class:`FedZOError` to handle anything fedzo-flwr raises on purpose. Each subclass also
derives from the built-in exception it refines (``ValueError`` for bad input), so generic
handlers keep working. Messages name the key, path or field at fault.

========================  ===================================================================
exception                 raised when
========================  ===================================================================
:class:`ConfigError`      a run-config value is invalid (the message names the key)
:class:`DataError`        a data folder, dataset file or partition file is missing or wrong
:class:`ReplyRejected`    a client reply fails validation (the server counts it, never raises)
:class:`CheckpointError`  a checkpoint is unreadable, corrupt or from an incompatible run
:class:`PruningError`     a pruning phase cannot produce a valid mask
:class:`RunSetupError`    a run cannot start (wraps the cause, for the ServerApp)
:class:`DeploymentError`  a local deployment cannot be brought up, used or torn down
========================  ===================================================================
"""

from __future__ import annotations


class FedZOError(Exception):
    """Base of every exception fedzo-flwr raises on purpose."""


class ConfigError(FedZOError, ValueError):
    """A run-config value is invalid; the message names the key."""


class DataError(FedZOError, ValueError):
    """A dataset, data folder or partition file is missing, unreadable or inconsistent."""


class ReplyRejected(FedZOError, ValueError):
    """A client reply failed validation; the message says why."""


class CheckpointError(FedZOError, ValueError):
    """A checkpoint cannot be used: unreadable, corrupt, or from an incompatible run."""


class PruningError(FedZOError, RuntimeError):
    """A pruning phase failed to produce a valid mask."""


class RunSetupError(FedZOError, RuntimeError):
    """The run cannot start; the message says which key or path is wrong."""


class DeploymentError(FedZOError, RuntimeError):
    """A local deployment step failed; the message says which process or file."""
