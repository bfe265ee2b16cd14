"""Table rows' synthetic sets (random control and selective ratios) and ``synthetic/manifest.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from histodiff.selection.centroid_filter import CandidateScores, Selection, quotas, select_random, select_selective

MANIFEST_COLUMNS = ["path", "class", "seed", "guidance_scale", "ddim_steps", "eta", "confidence", "dist_to_own_centroid",
                    "nearest_other_centroid", "dist_to_nearest_other", "nearest_centroid", "nn_real_feature_dist",
                    "nn_real_pixel_rms", "memorised", "selected", "selected_in", "why"]


def setting_name(kind: str, ratio: float) -> str:
    return f"{kind}_{round(ratio * 100)}"


def memorised(cfg, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The memorisation guard: candidates too close to a real labeled tile, in features or in pixels.

    The distances (``candidate_features.score_features``) are to the nearest real tile of the training side or of
    the validation split: a copy of a validation tile in the synthetic training set would leak that tile's slide
    into training."""
    a = cfg.augment
    return (scores["feature_nn"] < a.feature_threshold) | (scores["pixel_nn"] < a.pixel_threshold)


def make_selections(cfg, scores: dict[str, torch.Tensor], train_counts: dict[int, int],
                    class_names: list[str] | None = None) -> list[Selection]:
    a = cfg.augment
    guard = memorised(cfg, scores)
    cand = CandidateScores(scores["target"], scores["confidence"], scores["dist_own"], scores["nearest_class"],
                           scores["nearest_other"], scores["dist_other"])
    out = [select_random(setting_name("random", r), scores["target"], quotas(train_counts, r), guard, cfg.seed)
           for r in a.random_ratios]
    out += [select_selective(setting_name("selective", r), cand, a.tau, quotas(train_counts, r), guard, class_names)
            for r in a.ratios]
    return out


def write_manifest(path: Path, records: list[dict], scores: dict[str, torch.Tensor], selections: list[Selection],
                   classes: list[str], cfg) -> None:
    guard = memorised(cfg, scores)
    chosen = {s.name: set(s.indices) for s in selections}
    # the widest selective row explains the filter best; the random rows otherwise
    explain = sorted(selections, key=lambda s: (s.name.startswith("selective"), len(s.indices)))[-1] if selections else None
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for i, rec in enumerate(records):
            settings = [name for name, idx in chosen.items() if i in idx]
            why = [f"{explain.name}: {explain.reasons.get(i, '')}"] if explain is not None else []
            # a tile the random control took is explained by that too (it passed no filter)
            why += [f"{s.name}: {s.reasons[i]}" for s in selections if s is not explain and i in chosen[s.name]]
            writer.writerow({
                "path": f"{rec['path']}", "class": rec["class"], "seed": rec["seed"],
                "guidance_scale": rec["guidance_scale"], "ddim_steps": rec["ddim_steps"], "eta": rec["eta"],
                "confidence": f"{float(scores['confidence'][i]):.4f}",
                "dist_to_own_centroid": f"{float(scores['dist_own'][i]):.4f}",
                "nearest_other_centroid": classes[int(scores["nearest_other"][i])],
                "dist_to_nearest_other": f"{float(scores['dist_other'][i]):.4f}",
                "nearest_centroid": classes[int(scores["nearest_class"][i])],
                "nn_real_feature_dist": f"{float(scores['feature_nn'][i]):.4f}",
                "nn_real_pixel_rms": f"{float(scores['pixel_nn'][i]):.4f}",
                "memorised": "yes" if bool(guard[i]) else "no",
                "selected": "yes" if settings else "no", "selected_in": ";".join(settings), "why": "; ".join(why),
            })
    tmp.replace(path)
