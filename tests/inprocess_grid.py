"""An in-process Grid that hands each message straight to a ClientApp: unit tests and overhead baselines.

No networking and no processes; a node can be told to fail or to stay silent, to exercise dropouts.
"""

from __future__ import annotations

import itertools
import traceback
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


class InProcessGrid(Grid):
    def __init__(self, client_app, node_configs: dict[int, dict], run_config: dict):
        self.app = client_app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=dict(c), state=RecordDict(),
                                    run_config=dict(run_config)) for n, c in node_configs.items()}
        self.silent: set[int] = set()  # nodes that never answer (killed, or past the deadline)
        self.failing: set[int] = set()  # nodes whose ClientApp raises
        self.offline: set[int] = set()  # nodes not connected at all
        self.sent: list[Message] = []
        self._pending: dict[str, Message] = {}
        self._ids = itertools.count(1)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self._pending[mid] = msg
            self.sent.append(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in message_ids:
            msg = self._pending.get(mid)
            node = msg.metadata.dst_node_id if msg is not None else None
            if msg is None or node in self.silent:
                continue
            del self._pending[mid]
            if node in self.failing:
                replies.append(Message(Error(code=0, reason="site failure (injected)"), reply_to=msg))
                continue
            try:
                replies.append(self.app(msg, self.contexts[node]))
            except Exception as exc:  # noqa: BLE001 - a site error becomes an error reply, as in Flower
                reason = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                replies.append(Message(Error(code=1, reason=reason), reply_to=msg))
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
