"""What leaves a site: only the current phase's model arrays (names and shapes), latent statistics, scalar metrics,
under secure aggregation the protocol's public keys, encrypted shares and masked (uint32) arrays, and from the
memorisation check only its named counts and quantiles (``wire.contract.MEMORISATION_METRICS``).

``check_outgoing`` runs on every reply before the ClientApp returns it and raises instead of sending.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from wire.contract import ARRAYS_KEY, METRICS_KEY
from wire.secagg import RECORD_KEY


class OutboxViolation(RuntimeError):
    """A reply that would carry more than the phase allows; it is never sent."""


def check_outgoing(content: RecordDict, allowed: dict[str, tuple[int, ...]], *, masked: bool = False,
                   protocol: tuple[str, ...] = (), metrics: tuple[str, ...] | None = None) -> None:
    """Raise ``OutboxViolation`` unless ``content`` holds only allowed arrays (``wire.contract.phase_shapes``) and
    scalar metrics.

    ``masked``: every array must be a SecAgg+ masked upload (uint32); ``protocol``: the fields a SecAgg+ stage
    may send in its ``secagg`` record (public keys, ciphertexts, shares: bytes, integers, lists of them);
    ``metrics``: the only metric names the reply may carry (a reply of figures, such as the memorisation check's).
    """
    for key, record in content.items():
        if metrics is not None and key != METRICS_KEY:
            raise OutboxViolation(f"record {key!r} ({type(record).__name__}) may not leave the site: this reply "
                                  "carries figures only")
        if key == ARRAYS_KEY and isinstance(record, ArrayRecord):
            for name, array in record.items():
                if name not in allowed:
                    raise OutboxViolation(f"array {name!r} is not part of this phase's model; refusing to send")
                shape = tuple(int(s) for s in array.shape)
                if shape != tuple(allowed[name]):
                    raise OutboxViolation(f"array {name!r} has shape {shape}, the model has {tuple(allowed[name])}")
                if masked and array.dtype != "uint32":
                    raise OutboxViolation(f"array {name!r} is not masked ({array.dtype}) under secure aggregation")
        elif key == RECORD_KEY and protocol and isinstance(record, ConfigRecord):
            for name in record.keys():
                if name not in protocol:
                    raise OutboxViolation(f"secure-aggregation field {name!r} is not part of this stage; refusing to send")
        elif key == METRICS_KEY and isinstance(record, MetricRecord):
            for name, value in record.items():
                if isinstance(value, list) or isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise OutboxViolation(f"metric {name!r} is not a scalar; refusing to send")
                if metrics is not None and name not in metrics:
                    raise OutboxViolation(f"metric {name!r} is not one of this reply's figures; refusing to send")
        else:
            raise OutboxViolation(f"record {key!r} ({type(record).__name__}) may not leave the site")
