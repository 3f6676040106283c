"""An in-process Flower Grid: runs the real ServerApp against real ClientApps, no Ray/SuperLink.

Relies on Flower 1.41 private API (``TaskIdentity``), kept in this one helper.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]


def app_config(**overrides: object) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml with overrides (kebab-case keys)."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        config: dict[str, Any] = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return config


class InProcessGrid(Grid):
    """Delivers each message to a ClientApp called in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app under test.
    num_nodes : int
        Simulated nodes; node ``i`` gets partition ``i`` of ``num_nodes``.
    run_config : UserConfig
        The run config every node sees.
    intercept : callable, optional
        ``intercept(node_index, message, reply) -> reply | None``: lets a test tamper with
        replies (misbehaving clients) after the real ClientApp ran; ``None`` drops the reply
        (a node that disappeared).
    message_ids : bool
        Give every pushed message its id, as a SuperLink does (replies then name the message
        they answer in ``reply_to_message_id``). Off by default: the ids lengthen every reply
        by a few bytes, and the recorded byte counts of the golden run were measured without.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: UserConfig,
        intercept: Callable[[int, Message, Message], Message] | None = None,
        message_ids: bool = False,
    ) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.client_app = client_app
        self.node_ids = [1000 + 17 * i for i in range(num_nodes)]
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, node_id in enumerate(self.node_ids)
        }
        self.intercept = intercept
        self.message_ids = message_ids
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            if self.message_ids:  # private API: what a SuperLink does on push
                message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            try:
                reply = self.client_app(message, self.contexts[node_id])
            except Exception as err:  # the real runtime turns exceptions into error replies
                reply = Message(
                    Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message
                )
            if self.intercept is not None:
                reply = self.intercept(self.node_ids.index(node_id), message, reply)
            ids.append(message.object_id)
            if reply is not None:  # None: the node vanished, no reply ever comes
                self.replies[message.object_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def superlink_error(message: Message, reason: str) -> Message:
    """An error reply to ``message`` as the SuperLink makes it: its own id (0) as the sender."""
    reply = Message(Error(code=0, reason=reason), reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = 0  # private API: a SuperLink-made reply
    return reply


def server_context(run_config: UserConfig) -> Context:
    """Context for the ServerApp."""
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_server_logged(grid: Grid, run_config: UserConfig) -> list[str]:
    """Run the real ServerApp over ``grid``; the ``flwr`` logger's lines (INFO and up)."""
    from server_app.server_app import app as server_app

    capture = _Lines()
    logger = logging.getLogger("flwr")
    logger.addHandler(capture)
    try:
        server_app(grid, server_context(run_config))
    finally:
        logger.removeHandler(capture)
    return capture.lines
