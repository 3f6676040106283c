"""Run a whole federation in one process, without Flower (for benchmarks and tuning).

The Flower apps do exactly the same per round (same seeds, batches and update rule); this
driver just calls the client and server halves directly, which costs no messaging or Ray
start-up and makes parameter sweeps cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import load_dataset
from fedzo_flwr.data.client_data import load_client_data
from fedzo_flwr.logs import get_logger
from fedzo_flwr.run.evaluation import evaluate
from fedzo_flwr.run.setup import initial_model
from fedzo_flwr.zo.client import train_round
from fedzo_flwr.zo.server import ClientUpdate, ZOServer

logger = get_logger(__name__)


def run_inprocess(
    cfg: RunConfig,
    num_clients: int,
    test_examples: int = 10_000,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfg.num_server_rounds`` rounds with ``num_clients`` simulated clients.

    Returns one dict per evaluated round (``round``, ``accuracy``, ``loss``, ``seconds``).
    """
    start = time.perf_counter()
    init = initial_model(cfg)
    server = ZOServer(cfg, init.model, init.mask)
    clients = [load_client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    data = load_dataset(cfg.dataset, cfg.resolve_data_dir())
    x_test, y_test = data.x_test[:test_examples], data.y_test[:test_examples]
    history = []
    for server_round in range(1, cfg.num_server_rounds + 1):
        seed = server.round_seed(server_round)
        weights = server.kept_values().clone()
        updates = []
        for pid, (x, y) in enumerate(clients):
            server.space.scatter_(server.model, weights)  # what the client received
            result = train_round(cfg, server.model, server.space, x, y, seed, pid)
            updates.append(ClientUpdate(pid, result.num_examples, result.steps, result.base_loss))
        server.space.scatter_(server.model, weights)
        summary = server.apply_round(updates)
        if server_round % cfg.eval_every == 0 or server_round == cfg.num_server_rounds:
            loss, acc = evaluate(server.eval_model(), x_test, y_test, cfg.dataset)
            server.restore_training_weights()
            entry = {
                "round": server_round,
                "accuracy": acc,
                "loss": loss,
                "train_loss": summary.train_loss,
                "seconds": time.perf_counter() - start,
            }
            history.append(entry)
            logger.info(
                "round %d: acc %.4f loss %.4f train-loss %.4f (%.0fs)",
                server_round,
                acc,
                loss,
                summary.train_loss,
                entry["seconds"],
            )
            if on_round:
                on_round(entry)
    return history
