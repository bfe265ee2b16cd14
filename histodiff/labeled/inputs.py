"""Checks of the labeled-site inputs that run before any heavy work; each failure is a one-line InputError."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from histodiff.checkpoint import MODEL_INFO
from histodiff.data import TileFolder
from histodiff.downstream import carve_validation
from histodiff.errors import InputError


@dataclass
class LabeledInputs:
    labeled: TileFolder  # every labeled real tile (train + validation), no augmentation
    test: TileFolder
    classes: list[str]
    train_idx: list[int]  # positions in ``labeled`` used for training
    val_idx: list[int]  # carved from the labeled tiles, never from the test set
    model_info: dict


def check_model_dir(model_dir: Path, cfg) -> dict:
    """The exported global model's info, refusing a missing folder or one of another profile/size."""
    info_path = Path(model_dir) / MODEL_INFO
    if not Path(model_dir).is_dir():
        raise InputError(f"model folder {model_dir} does not exist (pass --model RUN_DIR/global)")
    if not info_path.is_file():
        raise InputError(f"{model_dir} is not a HistoDiffusion model folder (no {MODEL_INFO})")
    info = json.loads(info_path.read_text())
    if info.get("profile") != cfg.profile or info.get("image_size") != cfg.tiles.image_size:
        raise InputError(f"model {model_dir} was trained with profile {info.get('profile')} at "
                         f"{info.get('image_size')} px; this run uses profile {cfg.profile} at {cfg.tiles.image_size} px")
    for part in ("autoencoder", "unet"):
        if not (Path(model_dir) / part / "config.json").is_file():
            raise InputError(f"model folder {model_dir} has no {part}/ (an incomplete export?)")
    return info


def load_inputs(cfg, data: Path, test: Path, model_dir: Path, work_dir: Path) -> LabeledInputs:
    info = check_model_dir(model_dir, cfg)
    size, pixels = cfg.tiles.image_size, cfg.tiles.max_image_pixels
    labeled = TileFolder(data, size, work_dir=work_dir, labeled=True, max_image_pixels=pixels, augment=False)
    if len(labeled.classes) < 2:
        raise InputError(f"labeled folder {data} has {len(labeled.classes)} class(es) "
                         f"({', '.join(labeled.classes) or 'none'}); at least 2 class sub-folders are needed")
    testset = TileFolder(test, size, work_dir=work_dir, labeled=True, max_image_pixels=pixels, augment=False)
    if testset.classes != labeled.classes:
        only_train = sorted(set(labeled.classes) - set(testset.classes))
        only_test = sorted(set(testset.classes) - set(labeled.classes))
        raise InputError(f"test folder {test} has other classes than {data}: "
                         f"only in training: {', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}")
    a = cfg.augment
    train_idx, val_idx = carve_validation(labeled.labels, a.val_fraction, a.min_val_per_class, cfg.seed,
                                          labeled.classes)
    return LabeledInputs(labeled, testset, list(labeled.classes), train_idx, val_idx, info)
