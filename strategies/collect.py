"""Send one message per site, take each reply as it arrives, note the sites left out and why, check min-sites.

Every kind of round (training, latent statistics, SecAgg+ stages, delivery) is this one loop with its own
``take`` (what to do with a good reply) and ``refused`` (what to do with a site's error).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from flwr.app import Message
from flwr.serverapp import Grid

from strategies.aggregate import ReplyMismatch
from strategies.rounds import Later, RoundTrip, array_bytes

log = logging.getLogger("histodiff.fed")
WAIT_LOG_EVERY = 30.0  # seconds between "still waiting for" lines while replies are collected (0: never)


class RoundFailed(RuntimeError):
    """Fewer than min-sites answered (or were connected); the round is retried until the wait timeout."""


@dataclass
class Collected:
    asked: list[int]
    answered: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # node -> why it was left out
    sent: dict[int, int] = field(default_factory=dict)  # bytes of arrays sent to each site
    received: dict[int, int] = field(default_factory=dict)  # bytes of arrays received from each site
    pushed: float = 0.0  # when the messages were handed to the grid (epoch seconds)
    push_seconds: float = 0.0  # how long handing them over took (serialising and uploading to the SuperLink)
    arrived: dict[int, float] = field(default_factory=dict)  # when each reply was pulled (epoch seconds)
    take_seconds: dict[int, float] = field(default_factory=dict)  # checking and aggregating each reply

    def timeline(self) -> dict:
        """The round trip's clock times for ``metrics.jsonl`` (``benchmarks.paper_round`` splits a round with them)."""
        return {"pushed": self.pushed, "push_seconds": round(self.push_seconds, 3),
                "arrived": {str(k): v for k, v in self.arrived.items()},
                "take_seconds": {str(k): round(v, 3) for k, v in self.take_seconds.items()}}

    def require(self, needed: int) -> None:
        if len(self.answered) < needed:
            raise RoundFailed(f"{len(self.answered)} of {len(self.asked)} sites answered, min-sites={needed}")


def reason(reply: Message) -> str:
    """A site's error (its last line) or a reply without the expected records."""
    if reply.has_error():
        text = str(reply.error.reason).strip().splitlines()[-1] if reply.error.reason else ""
        return f"error {reply.error.code}: {text}"
    return "reply without the expected records"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _what(messages: list[Message | Later]) -> str:
    """``train.lae (global round 3)``: the message kind and the round (its group id) a collection is for."""
    if not messages:
        return "replies"
    kind, group = messages[0].metadata.message_type, messages[0].metadata.group_id
    return f"{kind} (global round {group})" if group else kind


class WaitLog:
    """Every ``every`` seconds while replies are awaited: one line naming the sites still silent, since when and
    the deadline, e.g. ``[fed] train.lae (global round 3): waiting for 1 of 3 site(s): 12; since 14:02:11 (30 s),
    deadline 14:12:11 (in 570 s)``."""

    def __init__(self, what: str, asked: int, every: float, say: Callable[[str], None]):
        self.what, self.asked, self.every, self.say = what, asked, float(every), say
        self.next = time.monotonic() + self.every

    def __call__(self, trip: RoundTrip) -> None:
        now = time.monotonic()
        if self.every <= 0 or now < self.next:
            return
        self.next = now + self.every
        waiting, queued = sorted(trip.pending.values()), trip.queued
        wall = time.time()
        later = f" (and {len(queued)} not sent yet: max-parallel-sites)" if queued else ""
        self.say(f"[fed] {self.what}: waiting for {len(waiting)} of {self.asked} site(s): "
                 f"{', '.join(str(n) for n in waiting)}{later}; since {_clock(trip.pushed)} ({wall - trip.pushed:.0f} s), "
                 f"deadline {_clock(trip.deadline_time)} (in {max(0.0, trip.deadline_time - wall):.0f} s)")


def collect(grid: Grid, messages: list[Message | Later], timeout: float, poll: float,
            take: Callable[[int, Message], int | None],
            refused: Callable[[int, str], None] | None = None, *,
            say: Callable[[str], None] | None = None, every: float | None = None, parallel: int = 0) -> Collected:
    """Push ``messages`` and feed each good reply to ``take`` (returns the bytes it received); a site whose reply is
    an error, or whose reply ``take`` rejects (KeyError, ValueError, TypeError, RuntimeError), is left out.

    While replies are awaited, every ``every`` seconds (default ``WAIT_LOG_EVERY``) one line goes to ``say``
    (default: this module's logger) naming the sites still awaited, since when, and the deadline. ``parallel`` > 0:
    at most that many messages out at once (``RoundTrip``; a ``Later`` entry is built at its turn)."""
    out = Collected([m.metadata.dst_node_id for m in messages])
    out.sent = {m.metadata.dst_node_id: 0 if isinstance(m, Later) else array_bytes(m) for m in messages}
    waiting = WaitLog(_what(messages), len(messages), WAIT_LOG_EVERY if every is None else every, say or log.info)
    out.pushed = time.time()
    trip = RoundTrip(grid, messages, timeout, poll, tick=waiting, parallel=parallel)
    out.push_seconds = time.time() - out.pushed
    log.info("%s: %d message(s) pushed in %.2f s%s", _what(messages), len(trip.pending), out.push_seconds,
             f"; {len(trip.queued)} wait for a free slot (max-parallel-sites {parallel})" if trip.queued else "")
    messages.clear()  # the grid holds them now: one copy of each model in memory, not two
    for node, reply in trip:
        out.arrived[node] = time.time()
        try:
            if reply.has_error():
                raise RuntimeError(reason(reply))
            out.received[node] = int(take(node, reply) or 0)
            out.answered.append(node)
            out.take_seconds[node] = time.time() - out.arrived[node]
        except (RuntimeError, KeyError, ValueError, TypeError, ReplyMismatch) as exc:
            out.dropped[node] = str(exc)
            if refused is not None:
                refused(node, str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever a reply holds, it never stops the server
            log.warning("reply of node %s rejected", node, exc_info=True)
            out.dropped[node] = f"malformed reply ({type(exc).__name__}: {str(exc)[:160]})"
            if refused is not None:
                refused(node, str(exc))
    out.sent.update(trip.sent)  # the messages built at their turn
    for node in trip.missing:
        out.dropped[node] = "missed the round deadline"
    return out
