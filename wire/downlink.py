"""The global model on its way down: whole fp32 weights, or, in a lossy transfer dtype, a delta against the copy the
site already holds.

The server keeps two models per phase: the exact fp32 global ``G`` and the broadcast copy ``S`` every synced site
holds. Each round it sends ``encode(G - S)`` and sets ``S += decode(that)``; what rounding removed stays in
``G - S`` and goes out with the next delta (error feedback on the downlink), so ``S`` trails ``G`` by at most one
round's rounding error and never drifts. A site that holds no copy, or not the one the delta is based on
(new, dropped out, restarted), gets ``S`` whole in fp32; digests on both ends check that a site's starting point
is exactly ``S``. In fp32 ``S`` is ``G``: every site gets the weights whole and keeps no copy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord

from wire.codec import apply_update, decode_tensor, difference, encode_tensor, from_record, to_record, weights_digest

MODE_KEY = "downlink"  # "full" | "delta"
BASE_KEY = "base-digest"  # the copy a delta applies to
DIGEST_KEY = "global-digest"  # the starting point after applying it


class OutOfSync(RuntimeError):
    """A delta for a copy the site does not hold; the server sends the whole model next round."""


class Broadcast:
    """Server side, one per training phase: what synced sites hold (``held``) and who holds it (``synced``)."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.held: dict[str, torch.Tensor] | None = None
        self.digest: str | None = None
        self.synced: set[int] = set()
        self._delta: ArrayRecord | None = None
        self._full: ArrayRecord | None = None
        self._config: dict = {}

    @property
    def lossy(self) -> bool:
        return self.dtype != "fp32"

    def prepare(self, global_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode this round's downlink; returns the starting point every site will train from."""
        self._full = self._delta = None
        if not self.lossy:
            self.held, self.digest = global_weights, None
            self._full = to_record(global_weights)
            self._config = {MODE_KEY: "full"}
            return global_weights
        if self.held is None:
            self.held = {k: v.clone() for k, v in global_weights.items()}
            base = None
        else:
            base = self.digest
            self._delta = ArrayRecord()
            new = {}
            for name, change in difference(global_weights, self.held).items():
                self._delta[name] = encode_tensor(change, self.dtype)
                sent = decode_tensor(self._delta[name])
                new[name] = self.held[name] + sent if sent.is_floating_point() else sent
            self.held = new
        self.digest = weights_digest(self.held)
        self._config = {DIGEST_KEY: self.digest, **({BASE_KEY: base} if base else {})}
        return self.held

    def record_for(self, node: int) -> tuple[ArrayRecord, dict]:
        """The arrays and config values for ``node``: the delta when it holds the base copy, else the whole model."""
        if self._delta is not None and node in self.synced:
            return self._delta, {**self._config, MODE_KEY: "delta"}
        if self._full is None:
            self._full = to_record(self.held)
        return self._full, {**{k: v for k, v in self._config.items() if k != BASE_KEY}, MODE_KEY: "full"}

    def release(self) -> None:
        """The round's messages are built: drop this object's references to the encoded arrays, so they live only
        as long as the messages (until they are pushed), not through the whole round."""
        self._delta = self._full = None

    def confirm(self, nodes) -> None:
        """After a round: ``nodes`` answered from this round's starting point, so they hold it."""
        self.synced = set(int(n) for n in nodes) if self.lossy else set()
        self._delta = self._full = None

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": v for k, v in (self.held or {}).items()} if self.lossy else {}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        held = {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}
        if self.lossy and held:
            self.held, self.digest = held, weights_digest(held)
        self.synced = set()  # after a restart nobody is known to hold it: the next round goes out whole


def receive(record: ArrayRecord, config, held_path: Path | None) -> dict[str, torch.Tensor]:
    """Site side: the round's starting point from the downlink (``config``: the round's ConfigRecord);
    in a lossy dtype the copy is kept at ``held_path`` for the next delta."""
    mode = str(config.get(MODE_KEY, "full"))
    if mode == "full":
        weights = from_record(record)
    elif mode == "delta":
        if held_path is None or not held_path.is_file():
            raise OutOfSync("a delta arrived but this site holds no global copy")
        have = held_path.with_suffix(".digest").read_text().strip() if held_path.with_suffix(".digest").is_file() else None
        if have != str(config[BASE_KEY]):
            raise OutOfSync(f"a delta for global {config[BASE_KEY]} arrived; this site holds {have}")
        from safetensors.torch import load_file

        weights = apply_update(load_file(str(held_path)), from_record(record))
    else:
        raise ValueError(f"unknown downlink mode {mode!r}")
    if DIGEST_KEY in config and held_path is not None:
        digest = weights_digest(weights)
        if digest != str(config[DIGEST_KEY]):
            raise OutOfSync(f"global model digest {digest} after the downlink, the server announced {config[DIGEST_KEY]}")
        _keep(weights, held_path, digest)
    return weights


def _keep(weights: dict[str, torch.Tensor], path: Path, digest: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    tmp.replace(path)
    path.with_suffix(".digest").write_text(digest)
