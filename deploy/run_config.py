"""The run config a deployed run will get, checked before it is submitted.

Flower's SuperLink refuses a ``--run-config`` key that the app's ``[tool.flwr.app.config]`` does
not declare, but tells the ``flwr`` CLI only ``[code: 15] Invalid run configuration.`` (the key
is named in the SuperLink's log alone), and it passes every value through unchecked, so a bad
value (``density=1.5``) fails inside the ServerApp after the run has started. ``run`` therefore
fuses the app's defaults with the overrides exactly as Flower does and validates the result with
the ServerApp's own :meth:`fedzo_flwr.config.RunConfig.from_run_config` first; every refusal
names the key.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from deploy.data import check_run_data
from deploy.errors import DeployError
from deploy.flower_cli import toml_string
from deploy.state import ROOT

_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
"""One ``key=value`` pair as Flower 1.41's ``parse_config_args`` finds it (it drops the rest)."""


def parse_overrides(run_config: str) -> dict[str, Any]:
    """``run_config`` (``'key=value ...'``, TOML values) parsed with Flower's own parser."""
    import click
    from flwr.common.config import parse_config_args

    if not run_config.strip():
        return {}
    leftover = _PAIR.sub(" ", run_config).split()
    if leftover and not run_config.strip().endswith(".toml"):
        raise DeployError(
            f"run-config {run_config!r}: cannot read {' '.join(leftover)!r}; write key=value "
            "pairs with no spaces around '=' (Flower would silently drop it)"
        )
    try:
        return dict(parse_config_args([run_config]))
    except (click.ClickException, ValueError, OSError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        raise DeployError(f"run-config {run_config!r}: {message}") from None


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]``, flattened as Flower flattens it."""
    from flwr.common.config import flatten_dict

    path = app_dir / "pyproject.toml"
    try:
        config = tomllib.loads(path.read_text())["tool"]["flwr"]["app"].get("config", {})
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise DeployError(f"cannot read [tool.flwr.app.config] of {path}: {err}") from None
    return dict(flatten_dict(config))


def unknown_keys(overrides: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """One message per override key the app does not declare, with the nearest known key."""
    problems = []
    for key in overrides:
        if key in defaults:
            continue
        near = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        problems.append(f"key '{key}': unknown key{hint}")
    return problems


def check_keys(overrides: dict[str, Any], app_dir: Path) -> dict[str, Any]:
    """The app's defaults fused with ``overrides``; :class:`DeployError` naming unknown keys."""
    defaults = app_defaults(app_dir)
    problems = unknown_keys(overrides, defaults)
    if problems:
        raise DeployError(
            "run-config refused before submission: "
            + "; ".join(problems)
            + "; a run may set only the keys of [tool.flwr.app.config] in "
            + str(app_dir / "pyproject.toml")
        )
    return {**defaults, **overrides}


def check_values(fused: dict[str, Any]) -> None:
    """Validate the fused run config as the ServerApp will; :class:`DeployError` naming the key."""
    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.errors import ConfigError

    try:
        RunConfig.from_run_config(fused)
    except ConfigError as err:
        raise DeployError(f"run-config refused before submission: {err}") from None


def checked_run_config(run_config: str, data_dir: str, app_dir: Path) -> str:
    """The ``--run-config`` string ``run`` submits, after every check passed.

    In order: the string parses; every key is one the app declares; the run's ``dataset``
    is in its ``data-dir`` (the run's own, else the deployment's ``data_dir``); the fused
    config validates (for this repository's app: :class:`fedzo_flwr.config.RunConfig`).
    ``data-dir`` and ``output-dir`` are prepended unless set (the deployment's data folder,
    ``outputs/`` of the repository).

    Raises
    ------
    DeployError
        At the first check that fails, naming the key.
    """
    overrides = parse_overrides(run_config)
    fused = check_keys(overrides, app_dir)
    extra = {}
    if "data-dir" not in overrides:
        extra["data-dir"] = data_dir
    if "output-dir" not in overrides:
        extra["output-dir"] = str(ROOT / "outputs")
    fused.update(extra)
    folder = Path(str(overrides.get("data-dir") or data_dir)).expanduser()
    check_run_data(str(fused.get("dataset", "cifar10")), folder)
    if app_dir.resolve() == ROOT:  # RunConfig is this repository's app's validation
        check_values(fused)
    prefix = [f"{key}={toml_string(value)}" for key, value in extra.items()]
    return " ".join([*prefix, run_config]).strip()
