"""An in-process Flower grid: a ServerApp's messages delivered to ClientApps in this process
(tests, benchmarks, debugging a ServerApp without a SuperLink).

Example::

    from asymvlm.federated.flower import client_app, run_flower_server
    from asymvlm.testing import LocalGrid

    run_config = {"cache-dir": "...", "num-clients": 2, "output-dir": "runs/local"}
    grid = LocalGrid(client_app, run_config, [{"partition-id": 0}, {"partition-id": 1}])
    state = run_flower_server(grid, run_config)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from asymvlm.federated.flower.config import log

__all__ = ["LocalGrid"]


class LocalGrid(Grid):
    """A :class:`flwr.serverapp.Grid` that delivers each message to a ClientApp in this process,
    one node per ``node_configs`` entry (node ids 1, 2, ...), each with its own node config and a
    persistent ``Context.state`` as a SuperNode keeps it, and its own copy of every message.
    Nodes in ``drop`` never answer; nodes in ``lost`` answer their first message only (the handshake:
    they die after it).
    A ClientApp's exception becomes an error reply, as a SuperNode sends it.

    Args:
        app: the ClientApp every node runs (``asymvlm.federated.flower.client_app``, or Flower's own).
        run_config: the run config every node's ``Context`` holds (the ServerApp gets it separately).
        node_configs: one node config per node (e.g. ``{"partition-id": 0, "cache-dir": "..."}``).
        apps: another ClientApp for some nodes, by node id (a hostile or failing node).
    """

    fixed_nodes = True  # every node is there from the start: the ServerApp does not wait for more

    def __init__(
        self,
        app: ClientApp,
        run_config: Mapping[str, Any],
        node_configs: Iterable[Mapping[str, Any]],
        apps: Mapping[int, ClientApp] | None = None,
    ):
        self.app = app
        self.apps = dict(apps or {})
        self.lost: set[int] = set()
        self._seen: dict[int, int] = {}
        self.contexts = {
            i + 1: Context(
                run_id=1, node_id=i + 1, node_config=dict(nc), state=RecordDict(), run_config=dict(run_config)
            )
            for i, nc in enumerate(node_configs)
        }
        self._run: Any = None
        # Flower's Message takes the run and node ids from the process's task identity (set by the
        # SuperLink / SuperNode runtimes); here one process plays the server and every node
        from flwr.supercore.task_identity import TaskIdentity

        self._identity = TaskIdentity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.drop: set[int] = set()
        self._replies: dict[str, Message] = {}
        self._counter = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._counter += 1
            mid = f"local-{self._counter}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node in self.drop or node not in self.contexts:
                continue
            self._seen[node] = self._seen.get(node, 0) + 1
            if node in self.lost and self._seen[node] > 1:  # it answered its first message only
                continue
            self._identity.node_id = node
            try:
                # a SuperNode receives its own deserialised copy (SecAgg+'s mod edits its records in place)
                self._replies[mid] = self.apps.get(node, self.app)(copy.deepcopy(msg), self.contexts[node])
            except Exception as err:  # what a SuperNode replies when its ClientApp raises
                from flwr.app import Error

                log.warning("node %d: %s raised %s: %s", node, msg.metadata.message_type, type(err).__name__, err)
                self._replies[mid] = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            finally:
                self._identity.node_id = 0
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))
