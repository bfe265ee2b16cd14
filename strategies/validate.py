"""Every reply is checked whole before it touches an aggregate: record types, names, declared and decoded shapes,
dtypes and stypes, finite values, a bounded ``num-examples``, sane latent statistics, and an update norm that is
not far above the others'. A reply that fails leaves its site out of the round with the reason; it never changes
the global model.
"""

from __future__ import annotations

import math
import statistics

import torch
from flwr.app import ArrayRecord, MetricRecord

from wire.codec import BF16_STYPE, INT8_STYPE, decode_tensor

NUMPY_STYPE = "numpy.ndarray"
FLOAT_WIRE = {(NUMPY_STYPE, "float32"), (NUMPY_STYPE, "float16"), (BF16_STYPE, "bfloat16"), (INT8_STYPE, "int8")}
INT_WIRE = {(NUMPY_STYPE, "int64"), (NUMPY_STYPE, "int32")}
LATENT_LIMIT = 1e4  # |mean| and sqrt(mean square) of a site's latents: a KL autoencoder's are O(1-100)


class BadReply(ValueError):
    """A reply that cannot be used; the message says why, in one line."""


def metrics_of(content, key: str = "metrics") -> MetricRecord:
    if key not in content:
        raise BadReply(f"reply without its {key!r} record")
    record = content[key]
    if not isinstance(record, MetricRecord):
        raise BadReply(f"{key!r} is a {type(record).__name__}, expected a MetricRecord")
    for name, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadReply(f"metric {name!r} is {value!r}, expected a finite number")
    return record


def num_examples(metrics: MetricRecord, declared: int | None, cap: int) -> float:
    """The FedAvg weight a site claims: a positive whole number, at most what it declared when it joined and ``cap``."""
    if "num-examples" not in metrics:
        raise BadReply("reply without num-examples")
    n = float(metrics["num-examples"])
    limit = min(cap, declared) if declared else cap
    if not (n >= 1 and n == int(n) and n <= limit):
        raise BadReply(f"num-examples {n:g} outside [1, {limit}] (declared when joining: {declared})")
    return n


def update_of(content, expected: dict[str, tuple[tuple[int, ...], bool]], key: str = "arrays",
              consume: bool = False) -> dict[str, torch.Tensor]:
    """The decoded update of a reply (fp32 floating arrays, integer buffers as they are), checked against
    ``expected``: name -> (shape, floating). ``consume``: each received array leaves the reply once decoded (the
    reply's bytes and its decoded update are never both whole in memory; the record is empty afterwards)."""
    if key not in content:
        raise BadReply(f"reply without its {key!r} record")
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise BadReply(f"{key!r} is a {type(record).__name__}, expected an ArrayRecord")
    names = set(record.keys())
    if names != set(expected):
        extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        raise BadReply(f"arrays differ from the global model's (extra {extra[:3]}, missing {missing[:3]})")
    out = {}
    for name in list(record.keys()):
        a = record[name]
        shape, floating = expected[name]
        declared = tuple(int(s) for s in a.shape)
        if declared != tuple(shape):
            raise BadReply(f"array {name} has shape {declared}, expected {tuple(shape)}")
        kind = (a.stype, a.dtype)
        if kind not in (FLOAT_WIRE if floating else INT_WIRE):
            raise BadReply(f"array {name} travels as {a.dtype} ({a.stype}), not a {'floating' if floating else 'integer'} "
                           "transfer type")
        try:
            t = decode_tensor(a)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the reply's fault
            raise BadReply(f"array {name} does not decode: {type(exc).__name__}: {str(exc)[:120]}") from None
        if tuple(t.shape) != tuple(shape):
            raise BadReply(f"array {name}: payload of shape {tuple(t.shape)}, declared {declared}")
        if floating and not bool(torch.isfinite(t).all()):
            raise BadReply(f"array {name} holds NaN or Inf")
        out[name] = t
        if consume:
            del record[name], a
    return out


def update_norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values() if v.is_floating_point()))


class NormGuard:
    """Refuses (or clips) an update whose L2 norm is above ``bound`` x the reference: the median norm of the
    previous round of the phase, or, in a phase's first round, of the updates accepted before it (two at least)."""

    def __init__(self, bound: float, action: str, reference: float | None):
        self.bound, self.action, self.reference = float(bound), action, reference
        self.norms: list[float] = []

    def check(self, update: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        norm = update_norm(update)
        ref = self.reference if self.reference else (statistics.median(self.norms) if len(self.norms) >= 2 else None)
        if self.bound > 0 and ref and norm > self.bound * ref:
            if self.action == "refuse":
                raise BadReply(f"update norm {norm:.3g} is {norm / ref:.1f}x the reference {ref:.3g} "
                               f"(norm-bound {self.bound:g})")
            scale = self.bound * ref / norm
            update = {k: (v * scale if v.is_floating_point() else v) for k, v in update.items()}
            norm = self.bound * ref
        self.norms.append(norm)
        return update, norm

    def next_reference(self) -> float | None:
        return statistics.median(self.norms) if self.norms else self.reference


def latent_stats(metrics: MetricRecord, declared: int | None, cap: int, latent_values: int) -> tuple[float, float, int]:
    """(sum, sum of squares, count) of a site's latents: a count of whole latent values of its tiles, and moments in
    the range a latent can have (``LATENT_LIMIT``; DP noise may make one site's variance negative, so only the
    combined one is checked, by the caller)."""
    try:
        s, s2, count = float(metrics["latent-sum"]), float(metrics["latent-sum-sq"]), float(metrics["latent-count"])
    except KeyError as exc:
        raise BadReply(f"latent statistics without {exc}") from None
    tiles = num_examples(metrics, declared, cap)
    if not (count >= 1 and count == int(count) and count <= tiles * latent_values):
        raise BadReply(f"latent-count {count:g} is not a count of latent values of {tiles:g} tiles")
    if not (abs(s / count) <= LATENT_LIMIT and 0 <= s2 / count <= LATENT_LIMIT ** 2):
        raise BadReply(f"latent moments out of range (mean {s / count:.3g}, mean square {s2 / count:.3g}; "
                       f"limit {LATENT_LIMIT:g})")
    return s, s2, int(count)
