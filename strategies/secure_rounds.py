"""SecAgg+ stages around a round's training message (the protocol itself: ``wire/secagg.py``).

Stages 1-2 (keys, encrypted shares) before the training message, stage 4 (unmasking) after it; each stage is one
``collect`` with a short poll, and a stage below ``max(min-sites, threshold, 2)`` sites fails the round.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Callable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from strategies.collect import RoundFailed, collect, reason
from wire.secagg import RECORD_KEY, SecAggError, SecAggParams, SecureSum
from wire.settings import Settings

log = logging.getLogger("histodiff.fed")


class SecureRounds:
    def __init__(self, grid: Grid, settings: Settings, cfg, message: Callable[[RecordDict, int, str], Message],
                 emit: Callable[[str], None]):
        self.grid, self.s, self.cfg, self.message, self.emit = grid, settings, cfg, message, emit

    def _exchange(self, nodes: list[int], kind: str, content: RecordDict):
        """One protocol stage: ``{node: protocol record}`` of the replies, ``{node: reason}`` of the silent/failed."""
        replies: dict = {}

        def take(node, reply):
            if RECORD_KEY not in reply.content:
                raise RuntimeError(reason(reply))
            replies[node] = reply.content[RECORD_KEY]

        # the sites answer these in milliseconds (no training): poll faster than a training round does
        got = collect(self.grid, [self.message(content, n, kind) for n in nodes], self.s.round_timeout,
                      min(self.s.poll, 0.05), take, say=self.emit)
        return replies, got.dropped

    def open(self, phase: str, round_no: int, nodes: list[int], shapes: dict, dropped: dict) -> SecureSum:
        """Stages 1 and 2: public keys, then encrypted Shamir shares routed between the sites."""
        t0 = time.time()
        round_id = f"{phase}-{round_no}-{secrets.token_hex(6)}"
        secure = SecureSum(SecAggParams.from_config(self.cfg, stats=phase == "latent-stats"), round_id, shapes)
        config = ConfigRecord({"phase": phase, "server-round": round_no})
        replies, lost = self._exchange(nodes, "query.secagg_keys",
                                       RecordDict({"config": config, RECORD_KEY: secure.key_request()}))
        _take(replies, secure.add_keys, lost, dropped, "keys")
        self.enough(len(secure.keys), len(nodes), 2, "sent public keys")
        try:
            request = secure.share_request()
        except SecAggError as exc:  # too many sites for the quantisation levels: fails every retry, then stops
            raise RoundFailed(str(exc)) from None
        replies, lost = self._exchange(sorted(secure.keys), "query.secagg_shares",
                                       RecordDict({"config": config, RECORD_KEY: request}))
        _take(replies, secure.add_shares, lost, dropped, "shares")
        self.enough(len(secure.sharers), len(nodes), secure.threshold, "shared their secrets")
        secure.seconds["keys+shares"] = round(time.time() - t0, 3)
        return secure

    def close(self, phase: str, secure: SecureSum, answered: list[int]):
        """Stage 4: unmask the sum with the survivors' shares; the weighted mean of the updates."""
        self.enough(len(answered), len(secure.sharers), secure.threshold, "sent a masked update")
        t0 = time.time()
        replies, lost = self._exchange(secure.masked, "query.secagg_unmask",
                                       RecordDict({"config": ConfigRecord({"phase": phase}),
                                                   RECORD_KEY: secure.unmask_request()}))
        for node, why in lost.items():
            self.emit(f"{phase}: site {node} sent no shares to unmask: {why}")
        try:
            mean = secure.unmask(replies)
        except (SecAggError, KeyError, ValueError) as exc:
            raise RoundFailed(f"secure aggregation could not unmask the sum: {exc}") from None
        secure.seconds["unmask"] = round(time.time() - t0, 3)
        log.info("secure aggregation: sum of %d masked updates unmasked (%d dropout(s) unmasked, threshold %d, "
                 "quantisation error <= %.3g)", len(secure.masked), len(secure.unmasked_dropouts), secure.threshold,
                 secure.bound)
        return mean

    def enough(self, have: int, asked: int, threshold: int, what: str) -> None:
        need = max(self.s.min_sites, threshold, 2)  # a "sum" of one site is that site's update
        if have < need:
            raise RoundFailed(f"secure aggregation: {have} of {asked} sites {what}, {need} needed "
                              f"(min-sites={self.s.min_sites}, threshold={threshold})")


def summary(secure: SecureSum, clipped: dict[int, float]) -> dict:
    return {"round_id": secure.round_id, "threshold": secure.threshold, "sites_keyed": len(secure.keys),
            "sites_shared": len(secure.sharers), "sites_masked": len(secure.masked),
            "dropouts_unmasked": secure.unmasked_dropouts, "quantisation_bound": secure.bound,
            "clipped_fraction_max": max(clipped.values(), default=0.0), "seconds": secure.seconds}


def _take(replies: dict, add: Callable, lost: dict, dropped: dict, stage: str) -> None:
    """Feed a protocol stage's replies to ``add``; malformed ones and the silent sites land in ``dropped``."""
    for node, rec in replies.items():
        try:
            add(node, rec)
        except (KeyError, TypeError, ValueError, SecAggError) as exc:
            lost[node] = f"malformed {stage} ({exc})"
    dropped.update({n: f"secure aggregation, {stage}: {r}" for n, r in lost.items()})
