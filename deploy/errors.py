"""The one exception the deployment tools raise."""

from __future__ import annotations

from fedzo_flwr.errors import DeploymentError


class DeployError(DeploymentError):
    """The deployment could not be started, found or stopped; the message says why."""
