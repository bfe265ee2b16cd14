"""Per-candidate evidence for selection: baseline-classifier features and confidence, real-only centroids,
nearest real tile (feature and pixel space), and InceptionV3 features for FID."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from histodiff.downstream import loader, predict
from histodiff.fid import inception_features
from histodiff.selection import class_centroids, nearest_distance, pixel_rms_distance, score_candidates

log = logging.getLogger("histodiff.augment")

PIXEL_SIDE = 64  # near-copies survive downsampling; full-size pixel arrays of every tile would not fit in RAM


@torch.no_grad()
def small_pixels(dataset: Dataset, batch_size: int) -> torch.Tensor:
    out = []
    for x, _ in loader(dataset, batch_size, False):
        if x.shape[-1] > PIXEL_SIDE:
            x = F.interpolate(x, size=(PIXEL_SIDE, PIXEL_SIDE), mode="bilinear", antialias=True, align_corners=False)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def score_all(baseline, img_size: int, labeled: Dataset, train_idx: list[int], candidates: Dataset,
              target: torch.Tensor, inception, num_classes: int, batch_size: int,
              device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Everything the selection, the manifest and FID need, as tensors (saved so reruns skip this)."""
    log.info("scoring: baseline features of %d real and %d synthetic tiles", len(labeled), len(candidates))
    _, real_feats, real_labels = predict(baseline, labeled, img_size, batch_size, device)
    logits, cand_feats, _ = predict(baseline, candidates, img_size, batch_size, device)
    train = torch.as_tensor(train_idx)
    # centroids from the real tiles the baseline was trained on; synthetic features never enter them
    centroids = class_centroids(real_feats[train], real_labels[train], num_classes)
    s = score_candidates(cand_feats, logits.softmax(dim=1), target, centroids)
    log.info("scoring: memorisation distances (features and %d px pixels)", PIXEL_SIDE)
    feat_nn = nearest_distance(cand_feats, real_feats)
    pix_nn = pixel_rms_distance(small_pixels(candidates, batch_size), small_pixels(labeled, batch_size))
    log.info("scoring: InceptionV3 features for FID")
    batches = (x for x, _ in loader(labeled, batch_size, False))
    real_incep = inception_features(inception, batches, device)
    fake_incep = inception_features(inception, (x for x, _ in loader(candidates, batch_size, False)), device)
    return {"target": target, "confidence": s.confidence, "dist_own": s.dist_own, "nearest_class": s.nearest_class,
            "nearest_other": s.nearest_other, "dist_other": s.dist_other, "feature_nn": feat_nn, "pixel_nn": pix_nn,
            "real_labels": real_labels, "real_inception": real_incep, "fake_inception": fake_incep,
            "centroids": centroids}


