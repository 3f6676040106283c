"""The command line: ``python -m deploy up|down|status|run|node ...``.

::

    python -m deploy up --mode tls-auth --nodes 2 --data-dir ../shared/data
    python -m deploy status
    python -m deploy run 'num-server-rounds=3 k=50'   # exit status: the run's outcome
    python -m deploy node stop 1        # simulate a device going away (node start 1: back)
    python -m deploy down

``python -m deploy.local ...`` is the same command line (kept as an alias).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deploy.commands import PROG, down, run_app, status, up
from deploy.data import dataset_arg
from deploy.errors import DeployError
from deploy.nodes import start_supernode, stop_process
from deploy.runs import EXIT_FAILED, EXIT_UNFINISHED
from deploy.state import DEFAULT_STATE_DIR, MODES, ROOT


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Local Flower deployment on 127.0.0.1: a SuperLink and N SuperNodes.",
    )
    state_help = "certs, keys, logs, PID files, DB, FLWR_HOME (default: .deploy/)"
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help=state_help)
    common = argparse.ArgumentParser(add_help=False)  # --state-dir after the subcommand too
    common.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p_up = sub.add_parser(
        "up", parents=[common], help="start a SuperLink and N SuperNodes, wait until online"
    )
    p_up.add_argument("--mode", choices=MODES, default="tls-auth")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument(
        "--data-dir",
        default=None,
        help="folder with cifar10.npz (default $FEDZO_DATA_DIR or ../shared/data)",
    )
    p_up.add_argument(
        "--dataset",
        type=dataset_arg,
        default=None,
        help="require this dataset in --data-dir (default: any; `run` checks the run's own)",
    )
    p_up.add_argument("--port", type=int, default=9093, help="SuperLink port (default 9093)")
    p_up.add_argument(
        "--node-port-base",
        type=int,
        default=None,
        help="first SuperNode Runtime API port (default PORT+1; node i: base+i)",
    )
    p_up.add_argument("--timeout", type=float, default=120.0)
    p_up.add_argument(
        "--node-data-dir",
        default=None,
        help="data-dir in each SuperNode's --node-config ({i} = node index; default: --data-dir)",
    )
    p_up.add_argument(
        "--node-cache-dir",
        default=None,
        help="$FEDZO_CACHE_DIR of each SuperNode ({i} = node index; default: inherited)",
    )
    p_up.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the SuperLink database (registered keys, runs) from last time",
    )

    p_down = sub.add_parser(
        "down", parents=[common], help="stop every process `up` started, by PID"
    )
    p_down.add_argument("--timeout", type=float, default=15.0, help="SIGTERM grace period")
    p_down.add_argument("--purge", action="store_true", help="also delete the state directory")

    sub.add_parser(
        "status", parents=[common], help="processes, log paths and `flwr supernode list`"
    )

    p_run = sub.add_parser(
        "run",
        parents=[common],
        help="check the run config, run the app, follow its log, exit with its outcome",
        description=(
            "Check the run config (unknown keys, invalid values, missing dataset: exit 1 "
            "before submission), submit the run, follow its log and exit with its outcome: "
            f"0 completed, 1 refused, {EXIT_FAILED} failed or stopped, {EXIT_UNFINISHED} "
            "not finished."
        ),
    )
    p_run.add_argument(
        "run_config",
        nargs="?",
        default="",
        help="run-config overrides, e.g. 'num-server-rounds=3 k=50'",
    )
    p_run.add_argument(
        "--no-stream", action="store_true", help="do not show the log (still wait for the end)"
    )
    p_run.add_argument(
        "--app-dir", default=str(ROOT), help="the Flower app to run (default: this repository)"
    )

    p_node = sub.add_parser("node", parents=[common], help="stop or (re)start one SuperNode")
    p_node.add_argument("action", choices=("stop", "start"))
    p_node.add_argument("index", type=int)
    p_node.add_argument("--kill", action="store_true", help="SIGKILL (a crash), not SIGTERM")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Command-line entry point (``python -m deploy``); the exit status."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "up":
            up(
                args.mode,
                args.nodes,
                args.data_dir,
                args.state_dir,
                args.port,
                args.node_port_base,
                timeout=args.timeout,
                keep_state=args.keep_state,
                node_data_dir=args.node_data_dir,
                node_cache_dir=args.node_cache_dir,
                dataset=args.dataset,
            )
        elif args.command == "down":
            down(args.state_dir, timeout=args.timeout, purge=args.purge)
        elif args.command == "status":
            return status(args.state_dir)
        elif args.command == "run":
            return run_app(
                args.state_dir, args.run_config, stream=not args.no_stream, app_dir=args.app_dir
            )
        elif args.command == "node":
            name = f"supernode-{args.index}"
            if args.action == "stop":
                stop_process(args.state_dir, name, kill=args.kill)
                print(f"[deploy] stopped {name}")
            else:
                record = start_supernode(args.state_dir, args.index)
                print(f"[deploy] started {name} (pid {record['pid']}), log {record['log']}")
    except DeployError as err:
        print(f"[deploy] error: {err}", file=sys.stderr)
        return 1
    return 0
