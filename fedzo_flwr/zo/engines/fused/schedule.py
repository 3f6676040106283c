"""How the K directions of a step are cut into chunks and handed to the workers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["balanced_chunks", "chunk_for_budget", "run_chunks"]


def chunk_for_budget(
    per_row_bytes: float, rows_per_direction: int, memory_budget_mb: float, k: int
) -> int:
    """Directions per chunk so that ``chunk * rows_per_direction * per_row_bytes`` ≤ budget.

    At least 1 (a budget below one copy's needs still runs, one direction at a time) and at
    most ``k``.
    """
    budget = memory_budget_mb * 2**20
    chunk = int(budget // (per_row_bytes * rows_per_direction))
    return max(1, min(k, chunk))


def balanced_chunks(k: int, chunk: int, workers: int = 1) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``0..k-1`` in chunks of at most ``chunk`` directions.

    The chunks have equal sizes (±1), and their number is a multiple of ``workers`` where ``k``
    allows it, so that no worker is left with a last, lone chunk: 200 directions in chunks of
    at most 16 on 2 workers are 14 chunks of 14 or 15, not 12 of 16 and one of 8.
    """
    if k < 1 or chunk < 1 or workers < 1:
        raise ValueError(f"k, chunk and workers must be >= 1, got {k}, {chunk}, {workers}")
    count = -(-k // chunk)
    if workers > 1:
        count = min(k, -(-count // workers) * workers)
    size, extra = divmod(k, count)
    bounds, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


Worker = Callable[[Callable[[], tuple[int, int] | None]], None]
"""A worker: called once with ``take()``, which hands out the next chunk or ``None``."""


def run_chunks(bounds: list[tuple[int, int]], workers: int, worker: Worker) -> None:
    """Run ``worker`` on ``workers`` threads that take the chunks ``bounds`` from one queue.

    With one worker it runs on the calling thread. Scheduling is dynamic: a worker slowed down
    by another process simply takes fewer chunks. Nothing here touches torch's thread
    settings: a new thread runs its kernels on the intra-op threads torch gives new threads
    (the process's ``torch.set_num_threads`` value), which the caller owns. An exception in a
    worker is raised here after all workers have stopped.
    """
    pending = iter(bounds)
    lock = threading.Lock()

    def take() -> tuple[int, int] | None:
        with lock:
            return next(pending, None)

    if workers == 1:
        worker(take)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="fedzo-fused") as pool:
        for future in [pool.submit(worker, take) for _ in range(workers)]:
            future.result()
