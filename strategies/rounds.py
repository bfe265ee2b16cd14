"""One round trip to a set of sites with a deadline, yielding each reply as soon as it arrives.

Flower's ``send_and_receive`` returns all replies at once (one model per site in memory) and its FedAvg
waits for ``min_available_nodes`` forever; this pulls one reply at a time and stops at the deadline.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid


class RoundTrip:
    """Push ``messages``; iterate to get ``(node_id, reply)`` pairs; afterwards ``missing`` lists the silent nodes.

    ``tick``: called once per poll while replies are awaited (``strategies.collect`` says what it waits for)."""

    def __init__(self, grid: Grid, messages: list[Message], timeout: float, poll: float = 0.5,
                 tick: Callable[["RoundTrip"], None] | None = None):
        self.grid, self.poll, self.tick = grid, poll, tick
        nodes = [m.metadata.dst_node_id for m in messages]
        self.pushed = time.time()
        ids = list(grid.push_messages(messages))
        self.pending: dict[str, int] = {mid: node for mid, node in zip(ids, nodes) if mid}
        self.unsent: list[int] = [node for mid, node in zip(ids, nodes) if not mid]
        self.deadline = time.monotonic() + timeout
        self.deadline_time = self.pushed + timeout  # the same deadline, wall clock
        self.missing: list[int] = []

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
            if self.tick is not None and self.pending:
                self.tick(self)
            if not arrived:
                time.sleep(min(self.poll, max(0.0, self.deadline - time.monotonic())))
        self.missing = self.unsent + list(self.pending.values())
        self.pending = {}
