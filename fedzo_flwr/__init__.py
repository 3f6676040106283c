"""fedzo-flwr core library: data-free foresight pruning and forward-only federated training.

Nothing in this package imports Flower (``flwr``); the Flower apps in ``server_app/`` and
``client_app/`` are thin glue over it.
"""

__version__ = "0.1.0"
