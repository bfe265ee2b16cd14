"""SecAgg+ in the federation's own message loop: the server learns only the weighted sum of the sites' updates.

One secure round (Bonawitz et al., CCS 2017; Bell et al., CCS 2020), complete graph, honest-but-curious server:

1. ``query.secagg_keys``   each site makes two ECDH key pairs and sends the public halves and its FedAvg weight.
2. ``query.secagg_shares`` the server broadcasts the keys; each site draws a private mask seed ``b``, splits ``b``
   and its mask secret key into Shamir shares (threshold ``t``) and encrypts each other site's pair of shares
   with their pairwise key; the server routes ciphertexts it cannot read.
3. ``train.<phase>``       the server forwards each site's ciphertexts with the model; the site trains, scales its
   update by its weight share, quantises it (stochastic rounding) and adds ``PRG(b)`` and ``+-PRG(s_ij)`` for
   every other site ``j``, all mod 2^32 (uint32 arithmetic wraps), and sends only that.
4. ``query.secagg_unmask`` the server names survivors and dropouts; each survivor returns its share of ``b`` for
   every survivor and of the mask key for every dropout, never both for one site, once per round.

The server adds the uploads as they arrive (uint32, wrapping; one model in memory), subtracts the survivors'
private masks and the dropouts' pairwise masks from the reconstructed secrets, and dequantises: the weighted
mean of the survivors' updates. Key agreement, Fernet encryption and Shamir sharing are Flower's primitives
(``flwr.supercore.primitives.asymmetric``, ``flwr.common.secure_aggregation.crypto``). The masks are a ChaCha20
keystream keyed by the full 256-bit secret: Flower's ``pseudo_rand_gen`` folds its seed to 32 bits and draws from
NumPy's Mersenne Twister, so a server could search all 2^32 seeds of one mask.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are handled: under Flower's process isolation every message starts a fresh
# ClientApp process, and the unmask stage needs only numpy and cryptography

WEIGHT_KEY = "secagg.weight"  # one masked element: the site's integer weight k_i (its share of K)
WEIGHT_LEVELS = 1 << 16  # K: a site's weight travels as round(n_i / max_weight * K)
MODULUS_BITS = 32
STATE_KEY = "secagg"  # the site's round secrets, in memory only (Flower's Context.state)
RECORD_KEY = "secagg"  # the protocol record in messages and replies
STATS_SHAPES = {"latent.mean": (1,), "latent.meansq": (1,)}  # what a site masks in a secure latent-stats round
REPLY_FIELDS = {"keys": ("pk1", "pk2", "weight"), "shares": ("dst", "ct"),
                "unmask": ("seed-nodes", "seed-shares", "sk-nodes", "sk-shares")}


class SecAggError(RuntimeError):
    """A protocol step that cannot go on (wrong round, inconsistent request, too few sites); one line."""


@dataclass(frozen=True)
class SecAggParams:
    """Quantisation and threshold of a secure round (``privacy.secagg_*``)."""

    clipping_range: float = 8.0  # each weighted update value is clipped to [-c, c] before quantisation
    levels: int = 1 << 22  # quantisation levels Q over [-c, c]
    threshold_fraction: float = 0.6  # t = max(2, ceil(fraction * sites)) shares rebuild a secret

    @classmethod
    def from_config(cls, cfg, stats: bool = False) -> "SecAggParams":
        p = cfg.privacy
        return cls(float(p.secagg_stats_range if stats else p.secagg_clipping_range), int(p.secagg_quantization_range),
                   float(p.secagg_threshold))

    @property
    def step(self) -> float:
        """One quantisation step (the largest rounding error of one site's value)."""
        return 2 * self.clipping_range / (self.levels - 1)

    def threshold(self, n: int) -> int:
        return min(n, max(2, math.ceil(self.threshold_fraction * n)))

    def check(self, n: int) -> None:
        if n * (self.levels - 1) >= 1 << MODULUS_BITS or n * WEIGHT_LEVELS >= 1 << MODULUS_BITS:
            raise SecAggError(f"{n} sites x {self.levels} quantisation levels overflow the 2^{MODULUS_BITS} modulus; "
                              "lower privacy.secagg_quantization_range")


# ------------------------------------------------------------------------------------------------ primitives


def _key32(shared: bytes) -> bytes:
    return base64.urlsafe_b64decode(shared)  # Flower's generate_shared_key: urlsafe base64 of 32 HKDF bytes


class MaskStream:
    """uint32 masks from a ChaCha20 keystream keyed by a 256-bit secret; consumed array by array, in order."""

    def __init__(self, key: bytes, round_id: str, purpose: str):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        if len(key) != 32:
            raise ValueError("mask keys are 32 bytes")
        nonce = b"\0\0\0\0" + hashlib.sha256(f"{purpose}|{round_id}".encode()).digest()[:12]  # block counter from 0
        self._enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def next(self, n: int) -> np.ndarray:
        return np.frombuffer(self._enc.update(bytes(4 * n)), dtype=np.uint32)


def pairwise_sign(me: int, other: int) -> int:
    """Site ``me`` adds the mask it shares with ``other`` when ``other`` is larger, else subtracts it."""
    return 1 if other > me else -1


def quantize(values: torch.Tensor, ratio: float, params: SecAggParams, gen: torch.Generator) -> tuple[np.ndarray, int]:
    """``ratio * values`` clipped to [-c, c] onto Q levels by stochastic rounding (unbiased); (uint32, clipped count)."""
    import torch

    top, inv = params.levels - 1, 1.0 / params.step
    v = values.detach().reshape(-1).to(torch.float64, copy=True)
    v.mul_(ratio * inv).add_(params.clipping_range * inv)  # the value's position on the grid [0, Q - 1]
    clipped = int(((v < 0) | (v > top)).sum())
    v.clamp_(0, top).add_(torch.rand(v.shape, generator=gen, dtype=torch.float32)).floor_().clamp_(max=top)
    return v.to(torch.int32).numpy().view(np.uint32), clipped  # Q < 2^31: int32 holds it; same bits as uint32


def masked_names(names: Iterable[str]) -> list[str]:
    """The order in which masks are drawn: the weight element first, then the arrays by name."""
    return [WEIGHT_KEY, *sorted(n for n in names if n != WEIGHT_KEY)]


def _pack(src: int, dst: int, seed_share: bytes, sk_share: bytes) -> bytes:
    return struct.pack("<QQI", src, dst, len(seed_share)) + seed_share + sk_share


def _unpack(data: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst, n = struct.unpack("<QQI", data[:20])
    return src, dst, data[20:20 + n], data[20 + n:]


# ------------------------------------------------------------------------------------------------ the site


class SiteSecAgg:
    """A site's side of one secure round; its secrets live in ``context.state`` (memory), never on disk."""

    def __init__(self, state: RecordDict, node_id: int, round_id: str):
        self.state, self.node, self.round_id = state, int(node_id), str(round_id)

    def _load(self) -> ConfigRecord:
        rec = self.state.config_records.get(STATE_KEY)
        if rec is None or rec.get("round") != self.round_id:
            have = rec.get("round") if rec is not None else None
            raise SecAggError(f"site has no secure round {self.round_id} (holds {have}); it restarted or skipped a stage")
        return rec

    @property
    def weight(self) -> int:
        """This round's integer weight k (of ``WEIGHT_LEVELS``), as the server forwarded it with the shares."""
        return int(self._load()["weight"])

    def keys(self, weight: float) -> ConfigRecord:
        """Stage 1: two fresh key pairs (pairwise encryption, pairwise masks); the public halves go out."""
        from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

        (sk1, pk1), (sk2, pk2) = generate_key_pairs(), generate_key_pairs()
        self.state[STATE_KEY] = ConfigRecord({"round": self.round_id, "sk1": private_key_to_bytes(sk1),
                                              "sk2": private_key_to_bytes(sk2), "pk1": public_key_to_bytes(pk1),
                                              "pk2": public_key_to_bytes(pk2)})
        return ConfigRecord({"pk1": public_key_to_bytes(pk1), "pk2": public_key_to_bytes(pk2), "weight": float(weight)})

    def shares(self, request: Mapping, params: SecAggParams | None = None) -> ConfigRecord:
        """Stage 2: Shamir shares of the mask seed and of the mask key, encrypted for each other site.

        ``params``: the site's own configuration; a threshold below its ``threshold(sites)`` is refused (fewer
        colluding sites could rebuild this site's secrets than the site agreed to).
        """
        from flwr.common.secure_aggregation.crypto.shamir import create_shares
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

        rec = self._load()
        nodes, pk1s, pk2s = [int(n) for n in request["nodes"]], list(request["pk1"]), list(request["pk2"])
        threshold = int(request["threshold"])
        if self.node not in nodes or len(set(nodes)) != len(nodes) or not len(nodes) == len(pk1s) == len(pk2s):
            raise SecAggError("malformed key list from the server")
        me = nodes.index(self.node)
        if pk1s[me] != rec["pk1"] or pk2s[me] != rec["pk2"]:
            raise SecAggError("the server's key list does not hold this site's own public keys")
        if not 2 <= threshold <= len(nodes):
            raise SecAggError(f"threshold {threshold} outside [2, {len(nodes)}]: refusing a round the server could unmask alone")
        if params is not None and threshold < params.threshold(len(nodes)):
            raise SecAggError(f"threshold {threshold} for {len(nodes)} sites is below this site's "
                              f"{params.threshold(len(nodes))} (privacy.secagg_threshold): refusing to share")
        seed = os.urandom(32)
        seed_shares = create_shares(seed, threshold, len(nodes))
        sk_shares = create_shares(bytes(rec["sk2"]), threshold, len(nodes))
        sk1 = bytes_to_private_key(bytes(rec["sk1"]))
        dst, ct = [], []
        for i, node in enumerate(nodes):
            if node == self.node:
                continue
            key = generate_shared_key(sk1, bytes_to_public_key(pk1s[i]))
            dst.append(node)
            ct.append(encrypt(key, _pack(self.node, node, seed_shares[i], sk_shares[i])))
        rec.update({"seed": seed, "threshold": threshold, "nodes": nodes, "all-pk1": pk1s, "all-pk2": pk2s,
                    "held-nodes": [self.node], "held-seed": [seed_shares[me]], "held-sk": [sk_shares[me]]})
        return ConfigRecord({"dst": dst, "ct": ct})

    def receive(self, request: Mapping) -> list[int]:
        """Stage 3, before training: decrypt the shares the other sites sent; returns the masking neighbours."""
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

        rec = self._load()
        nodes = [int(n) for n in rec["nodes"]]
        srcs, cts = [int(n) for n in request["src"]], list(request["ct"])
        if len(srcs) != len(cts) or len(set(srcs)) != len(srcs) or not set(srcs) <= set(nodes) - {self.node}:
            raise SecAggError("malformed share list from the server")
        if len(srcs) + 1 < int(rec["threshold"]):
            raise SecAggError(f"only {len(srcs) + 1} sites in the secure round, threshold {rec['threshold']}")
        sk1 = bytes_to_private_key(bytes(rec["sk1"]))
        pk1s = list(rec["all-pk1"])
        held_nodes, held_seed, held_sk = list(rec["held-nodes"]), list(rec["held-seed"]), list(rec["held-sk"])
        for src, ct in zip(srcs, cts):
            key = generate_shared_key(sk1, bytes_to_public_key(pk1s[nodes.index(src)]))
            got_src, got_dst, seed_share, sk_share = _unpack(decrypt(key, bytes(ct)))
            if (got_src, got_dst) != (src, self.node):
                raise SecAggError(f"shares routed wrongly: from {got_src} to {got_dst}, delivered as {src} -> {self.node}")
            held_nodes.append(src)
            held_seed.append(seed_share)
            held_sk.append(sk_share)
        neighbours = sorted(srcs)
        rec.update({"held-nodes": held_nodes, "held-seed": held_seed, "held-sk": held_sk, "neighbours": neighbours,
                    "weight": int(min(max(int(request["weight"]), 1), WEIGHT_LEVELS))})
        return neighbours

    def mask(self, update: Mapping[str, torch.Tensor], params: SecAggParams) -> tuple[ArrayRecord, int]:
        """Stage 3, after training: the quantised, weighted, masked update (uint32) and how many values were clipped."""
        import torch
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

        rec = self._load()
        if "neighbours" not in rec:
            raise SecAggError("masking before the shares were received")
        nodes, pk2s = [int(n) for n in rec["nodes"]], list(rec["all-pk2"])
        sk2 = bytes_to_private_key(bytes(rec["sk2"]))
        streams = [(1, MaskStream(bytes(rec["seed"]), self.round_id, "self"))]
        for other in rec["neighbours"]:
            shared = _key32(generate_shared_key(sk2, bytes_to_public_key(pk2s[nodes.index(int(other))])))
            streams.append((pairwise_sign(self.node, int(other)), MaskStream(shared, self.round_id, "pair")))
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        weight = int(rec["weight"])
        out, clipped = ArrayRecord(), 0
        for name in masked_names(update):
            if name == WEIGHT_KEY:
                q, shape = np.array([weight], dtype=np.uint32), (1,)
            else:
                values = update[name]  # computed on access by a lazy view: read once
                q, c = quantize(values, weight / WEIGHT_LEVELS, params, gen)
                clipped, shape = clipped + c, tuple(values.shape)
                del values
            for sign, stream in streams:
                (np.add if sign > 0 else np.subtract)(q, stream.next(q.size), out=q)  # wraps mod 2^32
            out[name] = Array(q.reshape(shape))
        rec["masked"] = True
        return out, clipped

    def unmask(self, request: Mapping) -> ConfigRecord:
        """Stage 4: shares of the survivors' seeds and the dropouts' mask keys; once, then the secrets are gone."""
        rec = self._load()
        if not rec.get("masked"):
            raise SecAggError("unmask requested before this site sent its masked update")
        active, dead = {int(n) for n in request["active"]}, {int(n) for n in request["dead"]}
        neighbours = {int(n) for n in rec["neighbours"]} | {self.node}
        if active & dead:
            raise SecAggError(f"sites {sorted(active & dead)} named both survivor and dropout: refusing to unmask")
        if active | dead != neighbours or self.node not in active:
            raise SecAggError("survivors and dropouts do not partition this round's sites: refusing to unmask")
        if len(active) < int(rec["threshold"]):
            raise SecAggError(f"{len(active)} survivors, threshold {rec['threshold']}: refusing to unmask")
        held = dict(zip((int(n) for n in rec["held-nodes"]), zip(rec["held-seed"], rec["held-sk"])))
        seed_nodes, sk_nodes = sorted(active), sorted(dead)
        reply = ConfigRecord({"seed-nodes": seed_nodes, "seed-shares": [held[n][0] for n in seed_nodes],
                              "sk-nodes": sk_nodes, "sk-shares": [held[n][1] for n in sk_nodes]})
        del self.state[STATE_KEY]
        return reply


# ------------------------------------------------------------------------------------------------ the server


class SecureSum:
    """The server's side of one secure round: routes keys and shares, sums masked uploads, unmasks the sum."""

    def __init__(self, params: SecAggParams, round_id: str, shapes: Mapping[str, tuple[int, ...]]):
        self.params, self.round_id = params, round_id
        self.shapes = {WEIGHT_KEY: (1,), **{k: tuple(v) for k, v in shapes.items()}}
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.weights: dict[int, float] = {}
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # dst -> src -> ciphertext
        self.sharers: list[int] = []
        self.masked: list[int] = []
        self.sums: dict[str, np.ndarray] = {}
        self.threshold = 0
        self.unmasked_dropouts: list[int] = []
        self.seconds: dict[str, float] = {}  # wall time of the protocol stages (the federation fills it)
        self.bound: float | None = None  # quantisation error bound of the unmasked mean

    # stage 1
    def key_request(self) -> ConfigRecord:
        return ConfigRecord({"round": self.round_id})

    def add_keys(self, node: int, rec: Mapping) -> None:
        self.keys[int(node)] = (bytes(rec["pk1"]), bytes(rec["pk2"]))
        self.weights[int(node)] = float(rec["weight"])

    def share_request(self) -> ConfigRecord:
        nodes = sorted(self.keys)
        self.params.check(len(nodes))
        self.threshold = self.params.threshold(len(nodes))
        return ConfigRecord({"round": self.round_id, "nodes": nodes, "pk1": [self.keys[n][0] for n in nodes],
                             "pk2": [self.keys[n][1] for n in nodes], "threshold": self.threshold})

    # stage 2
    def add_shares(self, node: int, rec: Mapping) -> None:
        dsts, cts = [int(n) for n in rec["dst"]], list(rec["ct"])
        if len(dsts) != len(cts) or set(dsts) != set(self.keys) - {int(node)}:
            raise SecAggError("share list does not address every other site")
        for dst, ct in zip(dsts, cts):
            self.ciphertexts.setdefault(dst, {})[int(node)] = bytes(ct)
        self.sharers.append(int(node))

    def forward(self, node: int, equal_weights: bool) -> ConfigRecord:
        """Stage 3's protocol record for ``node``: its shares from the other sharers, weight and quantisation."""
        srcs = sorted(s for s in self.sharers if s != node)
        scale = max(self.weights[n] for n in self.sharers)
        weight = WEIGHT_LEVELS if equal_weights else max(1, round(self.weights[node] / scale * WEIGHT_LEVELS))
        return ConfigRecord({"round": self.round_id, "src": srcs, "ct": [self.ciphertexts[node][s] for s in srcs],
                             "weight": int(weight)})

    # stage 3
    def add_masked(self, node: int, record: ArrayRecord) -> None:
        """Add one masked upload into the running uint32 sum (checked whole first, as the plain mean does)."""
        got = {name: (tuple(int(s) for s in a.shape), a.dtype) for name, a in record.items()}
        if set(got) != set(self.shapes):
            raise SecAggError(f"masked upload holds {len(got)} arrays, expected {len(self.shapes)}")
        bad = [n for n, (shape, dtype) in got.items() if shape != self.shapes[n] or dtype != "uint32"]
        if bad:
            raise SecAggError(f"masked array {bad[0]} is {got[bad[0]]}, expected uint32 {self.shapes[bad[0]]}")
        arrays = {}
        for name in record.keys():  # every payload decoded and checked before any is added
            try:
                a = record[name].numpy()
            except Exception as exc:  # noqa: BLE001 - a payload that does not decode is the upload's fault
                raise SecAggError(f"masked array {name} does not decode: {type(exc).__name__}") from None
            if a.shape != self.shapes[name] or a.dtype != np.uint32:
                raise SecAggError(f"masked array {name}: payload {a.dtype} {a.shape}, declared uint32 {self.shapes[name]}")
            arrays[name] = a
        for name, a in arrays.items():
            if name in self.sums:
                np.add(self.sums[name], a, out=self.sums[name])
            else:
                self.sums[name] = a.astype(np.uint32, copy=True)
        self.masked.append(int(node))

    # stage 4
    def unmask_request(self) -> ConfigRecord:
        if len(self.masked) < self.threshold:
            raise SecAggError(f"{len(self.masked)} masked uploads, threshold {self.threshold}: the sum cannot be unmasked")
        dead = sorted(set(self.sharers) - set(self.masked))
        return ConfigRecord({"round": self.round_id, "active": sorted(self.masked), "dead": dead})

    def unmask(self, replies: Mapping[int, Mapping]) -> dict[str, torch.Tensor]:
        """Remove the masks with the survivors' shares; returns the weighted mean of the updates (``bound``: its
        largest quantisation error per value, one step per survivor)."""
        import torch
        from flwr.common.secure_aggregation.crypto.shamir import combine_shares
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
        from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, public_key_to_bytes

        if len(replies) < self.threshold:
            raise SecAggError(f"{len(replies)} sites returned shares, threshold {self.threshold}: the sum stays masked")
        seeds: dict[int, list[bytes]] = {}
        sks: dict[int, list[bytes]] = {}
        for rec in replies.values():
            for n, share in zip(rec["seed-nodes"], rec["seed-shares"]):
                seeds.setdefault(int(n), []).append(bytes(share))
            for n, share in zip(rec["sk-nodes"], rec["sk-shares"]):
                sks.setdefault(int(n), []).append(bytes(share))
        names = masked_names(self.shapes)
        for node in self.masked:
            if len(seeds.get(node, [])) < self.threshold:
                raise SecAggError(f"too few shares of site {node}'s mask seed")
            _remove(self.sums, names, MaskStream(combine_shares(seeds[node][:self.threshold]), self.round_id, "self"))
        for dead in sorted(set(self.sharers) - set(self.masked)):
            if len(sks.get(dead, [])) < self.threshold:
                raise SecAggError(f"too few shares of dropped site {dead}'s mask key")
            sk = bytes_to_private_key(combine_shares(sks[dead][:self.threshold]))
            if public_key_to_bytes(sk.public_key()) != self.keys[dead][1]:
                raise SecAggError(f"the rebuilt mask key of site {dead} does not match its public key")
            for node in self.masked:  # node added sign(node, dead) * mask; take it out again
                shared = _key32(generate_shared_key(sk, bytes_to_public_key(self.keys[node][1])))
                _remove(self.sums, names, MaskStream(shared, self.round_id, "pair"), pairwise_sign(node, dead))
            self.unmasked_dropouts.append(dead)
        total_k = float(self.sums[WEIGHT_KEY][0])
        if total_k <= 0:
            raise SecAggError("unmasked total weight is zero")
        offset, share = len(self.masked) * self.params.clipping_range, total_k / WEIGHT_LEVELS
        mean = {name: torch.from_numpy((self.sums[name].astype(np.float64) * self.params.step - offset) / share)
                .to(torch.float32) for name in names if name != WEIGHT_KEY}
        self.sums = {}
        self.bound = len(self.masked) * self.params.step / share
        return mean


def _remove(sums: dict[str, np.ndarray], names: list[str], stream: MaskStream, sign: int = 1) -> None:
    """Take ``sign`` times the stream's masks out of ``sums`` in place (mod 2^32), array by array in mask order."""
    op = np.subtract if sign > 0 else np.add
    for name in names:
        op(sums[name], stream.next(sums[name].size).reshape(sums[name].shape), out=sums[name])


__all__ = ["SecAggParams", "SecAggError", "SiteSecAgg", "SecureSum", "MaskStream", "quantize", "WEIGHT_KEY",
           "WEIGHT_LEVELS", "RECORD_KEY", "REPLY_FIELDS", "STATS_SHAPES"]
