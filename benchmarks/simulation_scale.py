"""How many simulated clients the `flwr run .` simulation handles on this machine.

For each client count N it runs the real thing — ``flwr run .`` with a local SuperLink,
``num-supernodes=N`` virtual SuperNodes served by Ray actors (one per core,
``client-resources-num-cpus=1``), the product's ServerApp and ClientApp — for a few rounds on
CIFAR-10, and records:

* whether every round completed with the expected number of valid replies;
* wall time: the whole command (Ray and SuperLink start-up, server pruning, the rounds), the
  first round (which also starts the ClientApps: torch import, partitioning) and the median of
  the later rounds as the strategy measured them (``round_seconds`` in ``results.json``);
* memory: the peak, sampled every 0.5 s, of the summed proportional set size (PSS: shared pages
  split between the processes that map them, so nothing is counted twice) of every process of the
  run (``flwr``, the SuperLink, the simulation runtime, Ray's daemons and actors), and the peak
  rise of the machine's used memory (``MemTotal - MemAvailable``) over its value before the run.

Two sampling regimes:

* ``sampled`` (the cross-device setting): ``clients-per-round = --per-round`` (default 10) of
  the N nodes each round. Per-round cost is flat in N; what grows is the SuperLink's node table,
  the partitioning and the per-node state.
* ``all``: every node trains every round (``clients-per-round = 0``), so a round costs N client
  steps: reported up to ``--all-max`` clients.

The run uses the IID partitioner by default (``--partitioner``): Dirichlet(0.5) with at least 10
examples per client cannot split CIFAR-10's 50,000 training images among thousands of clients
(``partition_indices`` raises ``ValueError`` naming ``min_partition_size``), which is a property
of the partitioning, not of the simulation. Server pruning uses 2 NTK-SAP iterations
(``--prune-iterations``) because pruning cost does not depend on N.

The sweep stops at the first N that fails or exceeds ``--timeout`` seconds. Every run gets its
own ``FLWR_HOME``, free ports and Ray temp folder; its SuperLink is stopped by PID afterwards.

Usage::

    python benchmarks/simulation_scale.py [--clients 10 100 1000 5000] [--rounds 3]
        [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NotRequired, TypedDict

import numpy as np
import psutil
from machine import ROOT, data_dir, machine_info

sys.path.insert(0, str(ROOT / "scripts"))
from flwr_sandbox import flwr_run_command, sandbox_env
from stop_local_superlink import our_superlinks

MB = 2**20


class ScaleRow(TypedDict):
    """One ``flwr run .`` with ``clients`` SuperNodes: its outcome, times and memory."""

    clients: int
    clients_per_round: int
    regime: str
    rounds: int
    complete: bool
    timed_out: bool
    returncode: int | None
    wall_seconds: float
    first_round_seconds: float | None
    median_round_seconds: float | None
    prune_seconds: float | None
    peak_pss_bytes: int
    peak_used_rise_bytes: int
    peak_processes: int
    final_accuracy: float | None
    log_tail: NotRequired[str]


def used_memory() -> int:
    vm = psutil.virtual_memory()
    return int(vm.total - vm.available)


class TreeSampler(threading.Thread):
    """Samples the summed PSS of the run's processes and the machine's used memory."""

    def __init__(self, root_pid: int, flwr_home: str, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.flwr_home = flwr_home
        self.period = period
        self.stop_event = threading.Event()
        self.peak_pss = 0
        self.peak_used = 0
        self.peak_processes = 0

    def processes(self) -> list[psutil.Process]:
        roots = [self.root_pid, *our_superlinks(self.flwr_home)]
        seen: dict[int, psutil.Process] = {}
        for pid in roots:
            try:
                proc = psutil.Process(pid)
                seen[pid] = proc
                for child in proc.children(recursive=True):
                    seen[child.pid] = child
            except psutil.NoSuchProcess:
                continue
        return list(seen.values())

    def run(self) -> None:
        while not self.stop_event.is_set():
            total = 0
            procs = self.processes()
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak_pss = max(self.peak_pss, total)
            self.peak_used = max(self.peak_used, used_memory())
            self.peak_processes = max(self.peak_processes, len(procs))
            self.stop_event.wait(self.period)


def run_once(clients: int, per_round: int, args: argparse.Namespace) -> ScaleRow:
    """One ``flwr run .`` with ``clients`` SuperNodes; its outcome, times and memory."""
    work = Path(tempfile.mkdtemp(prefix="fedzo-scale-"))
    env, ray_tmp = sandbox_env(work)
    env["FEDZO_CACHE_DIR"] = str(work / "cache")
    flwr_home = env["FLWR_HOME"]
    out_dir = work / "out"
    run_config = (
        f"num-server-rounds={args.rounds} clients-per-round={per_round} "
        f'partitioner="{args.partitioner}" prune-iterations={args.prune_iterations} '
        f"eval-every={args.rounds} checkpoint-every=0 k={args.k} "
        f'data-dir="{data_dir(args.data_dir)}" output-dir="{out_dir}" run-name="scale"'
    )
    command = flwr_run_command(ROOT, clients, run_config)
    before = used_memory()
    start = time.perf_counter()
    log_path = work / "flwr.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, flwr_home)
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on SIGTERM/Ctrl-C: nothing of the run is left behind
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            sampler.stop_event.set()
            sampler.join()
            for pid in our_superlinks(flwr_home):
                os.kill(pid, signal.SIGTERM)
    seconds = time.perf_counter() - start
    results_path = out_dir / "scale" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    trained = [r for r in results.get("rounds", []) if r.get("round")]
    expected = per_round or clients
    complete = len(trained) == args.rounds and all(
        r.get("clients") == expected and not r.get("rejected") for r in trained
    )
    # Round 1 also starts the ClientApps (torch import, partitioning): steady state from round 2.
    round_seconds = [r["round_seconds"] for r in trained[1:] if "round_seconds" in r]
    tail = log_path.read_text()[-2000:]
    row: ScaleRow = {
        "clients": clients,
        "clients_per_round": expected,
        "regime": "all" if not per_round else "sampled",
        "rounds": args.rounds,
        "complete": complete,
        "timed_out": timed_out,
        "returncode": proc.returncode,
        "wall_seconds": seconds,
        "first_round_seconds": trained[0].get("round_seconds") if trained else None,
        "median_round_seconds": float(np.median(round_seconds)) if round_seconds else None,
        "prune_seconds": results.get("setup", {}).get("prune_seconds"),
        "peak_pss_bytes": sampler.peak_pss,
        "peak_used_rise_bytes": sampler.peak_used - before,
        "peak_processes": sampler.peak_processes,
        "final_accuracy": results.get("final", {}).get("accuracy"),
    }
    if not complete:
        row["log_tail"] = tail
    shutil.rmtree(ray_tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return row


def print_row(row: ScaleRow, header: bool) -> None:
    if header:
        print(
            "| clients | per round | complete | wall (s) | round 1 (s) | later rounds (s) "
            "| peak PSS (MB) "
            "| used-memory rise (MB) | processes |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
    med, first = row["median_round_seconds"], row["first_round_seconds"]
    print(
        f"| {row['clients']} | {row['clients_per_round']} | {'yes' if row['complete'] else 'NO'} "
        f"| {row['wall_seconds']:.0f} | {'-' if first is None else f'{first:.1f}'} "
        f"| {'-' if med is None else f'{med:.2f}'} "
        f"| {row['peak_pss_bytes'] / MB:.0f} | {row['peak_used_rise_bytes'] / MB:.0f} "
        f"| {row['peak_processes']} |",
        flush=True,
    )


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so the run's SuperLink is stopped (by PID) on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--per-round", type=int, default=10, help="sampled regime: nodes/round")
    parser.add_argument("--all-max", type=int, default=None, help="largest N for regime 'all'")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--partitioner", default="iid")
    parser.add_argument("--prune-iterations", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="10 and 50 clients, 2 rounds")
    args = parser.parse_args()
    sizes = args.clients or ([10, 50] if args.quick else [10, 100, 1000, 5000, 10000])
    args.rounds = args.rounds or (2 if args.quick else 4)
    all_max = args.all_max if args.all_max is not None else (50 if args.quick else 1000)

    memory_bytes = psutil.virtual_memory().total
    info = {**machine_info(None), "memory_bytes": memory_bytes}
    print(f"# {info['cpu']}, {info['cores']} cores, {memory_bytes / 2**30:.0f} GiB")
    rows: list[ScaleRow] = []
    for regime, per_round in (("sampled", args.per_round), ("all", 0)):
        for clients in sizes:
            if regime == "all" and clients > all_max:
                break
            if regime == "sampled" and clients < per_round:
                continue
            row = run_once(clients, per_round, args)
            rows.append(row)
            print_row(row, header=len(rows) == 1)
            if not row["complete"]:
                print(f"# N={clients} ({regime}) did not complete:\n{row['log_tail']}")
                break
    result = {
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "k": args.k,
            "partitioner": args.partitioner,
            "prune_iterations": args.prune_iterations,
            "ray_actors": "one per core (client-resources-num-cpus=1)",
            "timeout_s": args.timeout,
        },
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(r["complete"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
