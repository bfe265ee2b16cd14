"""Send one message per site, take each reply as it arrives, note the sites left out and why, check min-sites.

Every kind of round (training, latent statistics, SecAgg+ stages, delivery) is this one loop with its own
``take`` (what to do with a good reply) and ``refused`` (what to do with a site's error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from flwr.app import Message
from flwr.serverapp import Grid

from strategies.aggregate import ReplyMismatch
from strategies.rounds import RoundTrip

log = logging.getLogger("histodiff.fed")


class RoundFailed(RuntimeError):
    """Fewer than min-sites answered (or were connected); the round is retried until the wait timeout."""


@dataclass
class Collected:
    asked: list[int]
    answered: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # node -> why it was left out
    sent: dict[int, int] = field(default_factory=dict)  # bytes of arrays sent to each site
    received: dict[int, int] = field(default_factory=dict)  # bytes of arrays received from each site

    def require(self, needed: int) -> None:
        if len(self.answered) < needed:
            raise RoundFailed(f"{len(self.answered)} of {len(self.asked)} sites answered, min-sites={needed}")


def reason(reply: Message) -> str:
    """A site's error (its last line) or a reply without the expected records."""
    if reply.has_error():
        text = str(reply.error.reason).strip().splitlines()[-1] if reply.error.reason else ""
        return f"error {reply.error.code}: {text}"
    return "reply without the expected records"


def collect(grid: Grid, messages: list[Message], timeout: float, poll: float,
            take: Callable[[int, Message], int | None],
            refused: Callable[[int, str], None] | None = None) -> Collected:
    """Push ``messages`` and feed each good reply to ``take`` (returns the bytes it received); a site whose reply is
    an error, or whose reply ``take`` rejects (KeyError, ValueError, TypeError, RuntimeError), is left out."""
    out = Collected([m.metadata.dst_node_id for m in messages])
    out.sent = {m.metadata.dst_node_id: sum(r.count_bytes() for r in m.content.array_records.values())
                for m in messages}
    trip = RoundTrip(grid, messages, timeout, poll)
    messages.clear()  # the grid holds them now: one copy of each model in memory, not two
    for node, reply in trip:
        try:
            if reply.has_error():
                raise RuntimeError(reason(reply))
            out.received[node] = int(take(node, reply) or 0)
            out.answered.append(node)
        except (RuntimeError, KeyError, ValueError, TypeError, ReplyMismatch) as exc:
            out.dropped[node] = str(exc)
            if refused is not None:
                refused(node, str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever a reply holds, it never stops the server
            log.warning("reply of node %s rejected", node, exc_info=True)
            out.dropped[node] = f"malformed reply ({type(exc).__name__}: {str(exc)[:160]})"
            if refused is not None:
                refused(node, str(exc))
    for node in trip.missing:
        out.dropped[node] = "missed the round deadline"
    return out
