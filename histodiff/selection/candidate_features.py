"""Per-candidate evidence for selection: baseline-classifier features and confidence, class centroids of the real
training tiles, nearest real tile of either side of the validation split (feature and pixel space, the
memorisation guard), and InceptionV3 features for FID."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from histodiff.evaluation.downstream import predict
from histodiff.evaluation.fid import inception_features
from histodiff.selection.centroid_filter import class_centroids, nearest_distance, pixel_rms_distance, score_candidates

log = logging.getLogger("histodiff.augment")

PIXEL_SIDE = 64  # near-copies survive downsampling; full-size pixel arrays of every tile would not fit in RAM


def small_pixels(x: torch.Tensor) -> torch.Tensor:
    """A batch of images in [-1, 1] as uint8 at ``PIXEL_SIDE`` px (for the pixel-space memorisation guard)."""
    if x.shape[-1] > PIXEL_SIDE:
        x = F.interpolate(x, size=(PIXEL_SIDE, PIXEL_SIDE), mode="bilinear", antialias=True, align_corners=False)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _features(baseline, img_size: int, inception, dataset: Dataset, batch_size: int, device):
    """(logits, baseline features, labels, small pixels, Inception features) of a dataset in one pass."""
    pixels, incep = [], []

    def more(x: torch.Tensor) -> None:
        pixels.append(small_pixels(x))
        incep.append(inception_features(inception, [x], device))

    logits, feats, labels = predict(baseline, dataset, img_size, batch_size, device, on_batch=more)
    return (logits, feats, labels, torch.cat(pixels),
            torch.cat(incep) if incep else torch.empty(0, 2048, dtype=torch.float64))


def score_all(baseline, img_size: int, labeled: Dataset, train_idx: list[int], candidates: Dataset,
              target: torch.Tensor, inception, num_classes: int, batch_size: int,
              device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Everything the selection, the manifest and FID need, as tensors (saved so reruns skip this).

    ``labeled``: every labeled real tile (training and validation side); ``train_idx``: its training side. See
    :func:`score_features` for which real tiles each score uses."""
    log.info("scoring: baseline, InceptionV3 and %d px pixel features of %d real and %d synthetic tiles", PIXEL_SIDE,
             len(labeled), len(candidates))
    _, real_feats, real_labels, real_pix, real_incep = _features(baseline, img_size, inception, labeled, batch_size,
                                                                 device)
    logits, cand_feats, _, cand_pix, fake_incep = _features(baseline, img_size, inception, candidates, batch_size,
                                                            device)
    scores = score_features(real_feats, real_labels, real_pix, train_idx, cand_feats, logits.softmax(dim=1),
                            cand_pix, target, num_classes)
    return {**scores, "real_inception": real_incep, "fake_inception": fake_incep}


def score_features(real_feats: torch.Tensor, real_labels: torch.Tensor, real_pix: torch.Tensor, train_idx: list[int],
                   cand_feats: torch.Tensor, cand_probs: torch.Tensor, cand_pix: torch.Tensor, target: torch.Tensor,
                   num_classes: int) -> dict[str, torch.Tensor]:
    """Candidate scores from features; rows of ``real_*`` are the labeled tiles, ``train_idx`` their training side.

    - class centroids (the nearest-centroid filter): real tiles of the training side only, never a tile of the
      validation split (of a validation slide, when the split is by slide) and never a synthetic one;
    - memorisation guard (``feature_nn``, ``pixel_nn``): the nearest real tile of either side. A near-copy of a
      validation tile taken into training would put that tile (its slide) on both sides of the split, so the guard
      must see the validation side too; it can only drop candidates, never move a centroid or a threshold.
    """
    train = torch.as_tensor(sorted(set(int(i) for i in train_idx)), dtype=torch.long)
    if len(train) == 0 or int(train.min()) < 0 or int(train.max()) >= len(real_feats):
        raise ValueError(f"training positions must be a non-empty subset of the {len(real_feats)} real tiles")
    centroids = class_centroids(real_feats[train], real_labels[train], num_classes)
    s = score_candidates(cand_feats, cand_probs, target, centroids)
    feat_nn = nearest_distance(cand_feats, real_feats)
    pix_nn = pixel_rms_distance(cand_pix, real_pix)
    return {"target": target, "confidence": s.confidence, "dist_own": s.dist_own, "nearest_class": s.nearest_class,
            "nearest_other": s.nearest_other, "dist_other": s.dist_other, "feature_nn": feat_nn, "pixel_nn": pix_nn,
            "real_labels": real_labels, "centroids": centroids,
            "centroid_positions": train}  # which real tiles formed the centroids, saved for audit
