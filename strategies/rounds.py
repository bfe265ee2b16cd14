"""One round trip to a set of sites with a deadline, yielding each reply as soon as it arrives.

Flower's ``send_and_receive`` returns all replies at once (one model per site in memory) and its FedAvg
waits for ``min_available_nodes`` forever; this pulls one reply at a time and stops at the deadline.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Callable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid


class Later:
    """A message built when its site's turn comes (``parallel``): a queued site's copy of the model is not held in
    memory while the sites before it train. ``metadata`` carries the destination, type and group of the message."""

    def __init__(self, node: int, message_type: str, group_id: str, build: Callable[[], Message]):
        self.build = build
        self.metadata = SimpleNamespace(dst_node_id=node, message_type=message_type, group_id=group_id)


def array_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries."""
    return sum(r.count_bytes() for r in message.content.array_records.values())


class RoundTrip:
    """Push ``messages``; iterate to get ``(node_id, reply)`` pairs; afterwards ``missing`` lists the silent nodes.

    ``tick``: called once per poll while replies are awaited (``strategies.collect`` says what it waits for).
    ``parallel`` > 0: at most that many messages are out at once; the next is pushed when a reply arrives (sites
    that share one machine or one GPU node then train in waves, within the same deadline). 0: all at once.
    ``messages`` may hold ``Later`` entries: each is built just before it is pushed; ``sent`` has their bytes.
    The next message goes out after the reply that freed its slot has been taken (aggregated and dropped), so a
    reply and the next push are never in memory together."""

    def __init__(self, grid: Grid, messages: list[Message | Later], timeout: float, poll: float = 0.5,
                 tick: Callable[["RoundTrip"], None] | None = None, parallel: int = 0):
        self.grid, self.poll, self.tick = grid, poll, tick
        self.pushed = time.time()
        self.deadline = time.monotonic() + timeout
        self.deadline_time = self.pushed + timeout  # the same deadline, wall clock
        self.pending: dict[str, int] = {}
        self.unsent: list[int] = []
        self.missing: list[int] = []
        self.sent: dict[int, int] = {}  # bytes of the ``Later`` messages built and pushed
        self.limit = parallel if parallel > 0 else len(messages)
        self._queue = list(messages)  # not yet pushed, in order
        self._push()

    @property
    def queued(self) -> list[int]:
        """The nodes whose messages wait for a free slot (``parallel``)."""
        return [m.metadata.dst_node_id for m in self._queue]

    def _push(self) -> None:
        """Push queued messages while fewer than ``limit`` are out."""
        while self._queue and len(self.pending) < self.limit:
            free = self.limit - len(self.pending)
            batch, self._queue = self._queue[:free], self._queue[free:]
            nodes = [m.metadata.dst_node_id for m in batch]
            for i, m in enumerate(batch):
                if isinstance(m, Later):
                    batch[i] = m.build()
                    self.sent[nodes[i]] = array_bytes(batch[i])
            ids = list(self.grid.push_messages(batch))
            del batch
            self.pending.update({mid: node for mid, node in zip(ids, nodes) if mid})
            self.unsent += [node for mid, node in zip(ids, nodes) if not mid]

    def __iter__(self) -> Iterator[tuple[int, Message]]:
        while self.pending and time.monotonic() < self.deadline:
            arrived = False
            for mid in list(self.pending):
                for reply in self.grid.pull_messages([mid]):
                    node = self.pending.pop(reply.metadata.reply_to_message_id or mid, None)
                    if node is None:
                        node = self.pending.pop(mid, -1)
                    arrived = True
                    yield node, reply
                    del reply
                    self._push()  # a slot is free and the reply is taken: the next site's message goes out
            if self.tick is not None and self.pending:
                self.tick(self)
            if not arrived:
                time.sleep(min(self.poll, max(0.0, self.deadline - time.monotonic())))
        self.missing = self.unsent + list(self.pending.values()) + self.queued
        self.pending, self._queue = {}, []
