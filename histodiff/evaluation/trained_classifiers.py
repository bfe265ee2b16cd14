"""Saving and loading the site's timm image classifiers (auxiliary phi, baseline downstream) as
safetensors + a JSON config, and training them on a split of the labeled tiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from histodiff.model_files import load_state_dict_file, save_state_dict_file
from histodiff.evaluation.downstream import TrainedClassifier, train_classifier
from histodiff.labeled_site.stage_markers import plain

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_classifier(out: Path, trained: TrainedClassifier, clf_cfg, classes: list[str], **extra: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict_file(trained.model.state_dict(), out / WEIGHTS)
    meta = {"classifier": plain(clf_cfg), "classes": classes, "img_size": trained.img_size,
            "best_val_accuracy": trained.best_val_accuracy, "history": trained.history, **extra}
    (out / CONFIG).write_text(json.dumps(meta, indent=1))


def load_classifier(out: Path) -> tuple[torch.nn.Module, dict]:
    from omegaconf import OmegaConf

    from histodiff.evaluation.image_classifier import build_image_classifier

    meta = json.loads((out / CONFIG).read_text())
    clf_cfg = OmegaConf.create({**meta["classifier"], "pretrained_path": None})
    model = build_image_classifier(clf_cfg, len(meta["classes"]))
    model.load_state_dict(load_state_dict_file(out / WEIGHTS))
    return model.eval(), meta


def train_site_classifier(cfg, clf_cfg, train_set: Dataset, val_set: Dataset, num_classes: int, seed: int,
                          name: str) -> TrainedClassifier:
    """``train_classifier`` with the site's batch size and data-loading workers."""
    return train_classifier(clf_cfg, cfg.train, train_set, val_set, num_classes, seed, cfg.tiles.batch_size, name,
                            cfg.tiles.num_workers)
