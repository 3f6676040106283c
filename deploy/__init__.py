"""Local multi-node Flower deployments on loopback (``python -m deploy.local --help``)."""
