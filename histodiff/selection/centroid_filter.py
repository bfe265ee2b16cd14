"""Selective augmentation (paper stage 5): class centroids of the real training tiles, a nearest-centroid +
confidence filter, per-class quotas filled by distance rank, the random control, and a memorisation guard against
real tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


def class_centroids(real_features: torch.Tensor, real_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One mean feature per class, from real training tiles only (never synthetic ones)."""
    centroids = torch.zeros(num_classes, real_features.shape[1], dtype=real_features.dtype)
    for c in range(num_classes):
        members = real_features[real_labels == c]
        if len(members) == 0:
            raise ValueError(f"class {c} has no real tiles to form a centroid")
        centroids[c] = members.mean(dim=0)
    return centroids


@dataclass
class CandidateScores:
    """Per synthetic candidate: what the filter and the manifest need."""

    target: torch.Tensor  # class it was generated for
    confidence: torch.Tensor  # baseline classifier's softmax probability of the target class
    dist_own: torch.Tensor  # feature distance to the target class centroid
    nearest_class: torch.Tensor  # class of the nearest centroid
    nearest_other: torch.Tensor  # nearest centroid other than the target
    dist_other: torch.Tensor  # distance to that centroid


def score_candidates(features: torch.Tensor, probs: torch.Tensor, target: torch.Tensor,
                     centroids: torch.Tensor) -> CandidateScores:
    dist = torch.cdist(features.double(), centroids.double()).float()  # N x C
    own = dist.gather(1, target.view(-1, 1)).squeeze(1)
    masked = dist.clone()
    masked.scatter_(1, target.view(-1, 1), float("inf"))
    dist_other, nearest_other = masked.min(dim=1)
    return CandidateScores(target=target, confidence=probs.gather(1, target.view(-1, 1)).squeeze(1),
                           dist_own=own, nearest_class=dist.argmin(dim=1), nearest_other=nearest_other,
                           dist_other=dist_other)


def quotas(real_counts: dict[int, int], ratio: float) -> dict[int, int]:
    """Synthetic tiles wanted per class: ratio x real tiles of that class (rounded half up)."""
    return {c: int(math.floor(ratio * n + 0.5)) for c, n in real_counts.items()}


def nearest_distance(queries: torch.Tensor, references: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2 distance from each query row to its nearest reference row (flattened), in chunks to bound memory."""
    refs = references.flatten(1).double()
    out = [torch.cdist(q.flatten(1).double(), refs).min(dim=1).values for q in queries.split(batch)]
    return torch.cat(out).float() if out else torch.empty(0)


def pixel_rms_distance(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Nearest-reference distance as an RMS over pixels in [0, 1] (inputs uint8 or [0, 1] floats)."""
    scale = 255.0 if queries.dtype == torch.uint8 else 1.0
    n = queries[0].numel() if len(queries) else 1
    return nearest_distance(queries.float() / scale, references.float() / scale) / math.sqrt(n)


@dataclass
class Selection:
    """The tiles one setting keeps, why every candidate was or was not kept, and unmet quotas."""

    name: str
    indices: list[int]
    reasons: dict[int, str]
    shortfall: dict[int, int] = field(default_factory=dict)  # class -> tiles missing from its quota
    memorised: int = 0  # tiles that would have been taken but were too close to a real tile

    @property
    def met(self) -> bool:
        return not any(self.shortfall.values())


def _fill(name: str, order_by_class: dict[int, list[int]], want: dict[int, int], memorised: torch.Tensor,
          reasons: dict[int, str], what: str) -> Selection:
    chosen: list[int] = []
    shortfall: dict[int, int] = {}
    dropped = 0
    for c, order in order_by_class.items():
        taken = 0
        for rank, i in enumerate(order):
            if taken >= want.get(c, 0):
                reasons.setdefault(i, f"passed the filter but beyond the quota of {want.get(c, 0)}")
                continue
            if bool(memorised[i]):
                reasons[i] = ("dropped by the memorisation guard (too close to a real labeled tile, training or "
                              "validation side)")
                dropped += 1
                continue
            chosen.append(i)
            taken += 1
            reasons[i] = f"{what} (rank {rank + 1} of {len(order)}, quota {want.get(c, 0)})"
        shortfall[c] = want.get(c, 0) - taken
    return Selection(name, sorted(chosen), reasons, shortfall, dropped)


def select_selective(name: str, scores: CandidateScores, tau: float, want: dict[int, int],
                     memorised: torch.Tensor, class_names: Sequence[str] | None = None) -> Selection:
    """Keep a candidate when its nearest centroid is its target and confidence >= tau; closest first."""
    label = (lambda c: class_names[c]) if class_names is not None else str
    reasons: dict[int, str] = {}
    order_by_class: dict[int, list[int]] = {c: [] for c in want}
    for i in range(len(scores.target)):
        c = int(scores.target[i])
        if int(scores.nearest_class[i]) != c:
            reasons[i] = f"nearest centroid is class {label(int(scores.nearest_class[i]))}, not its target {label(c)}"
        elif float(scores.confidence[i]) < tau:
            reasons[i] = f"confidence {float(scores.confidence[i]):.3f} < tau {tau}"
        else:
            order_by_class.setdefault(c, []).append(i)
    for c, order in order_by_class.items():
        order.sort(key=lambda i: float(scores.dist_own[i]))
    return _fill(name, order_by_class, want, memorised, reasons, "selected: nearest centroid is its class")


def select_random(name: str, target: torch.Tensor, want: dict[int, int], memorised: torch.Tensor,
                  seed: int) -> Selection:
    """The control: the same counts per class drawn at random from the candidates, no filter."""
    gen = torch.Generator().manual_seed(seed)
    order_by_class = {}
    for c in want:
        members = (target == c).nonzero().flatten()
        order_by_class[c] = members[torch.randperm(len(members), generator=gen)].tolist()
    return _fill(name, order_by_class, want, memorised, {}, "selected at random")
