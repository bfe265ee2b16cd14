"""Checks of the labeled-site inputs that run before any heavy work; each failure is a one-line InputError."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from histodiff.model_files import MODEL_INFO
from histodiff.data import TileFolder, TileOptions, TileIndex
from histodiff.evaluation.downstream import carve_validation
from histodiff.errors import InputError
from histodiff.weights.locate import sha256_of

log = logging.getLogger("histodiff.augment")


@dataclass
class LabeledInputs:
    labeled: TileFolder  # every labeled real tile (train + validation), no augmentation
    test: TileFolder
    classes: list[str]
    train_idx: list[int]  # positions in ``labeled`` used for training
    val_idx: list[int]  # carved from the labeled tiles, never from the test set
    model_info: dict


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} is not valid JSON ({_first_line(exc)}); re-export or re-deliver the model") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_weights_files(folder: Path) -> None:
    """A diffusers model folder's config and weights exist and are whole (safetensors headers cover the file)."""
    from safetensors import safe_open

    _read_json(folder / "config.json")
    tensors = sorted(folder.glob("*.safetensors"))
    if not tensors and not list(folder.glob("*.bin")):
        raise InputError(f"model folder {folder} has no weights file (diffusion_pytorch_model.safetensors); "
                         "an incomplete export or copy?")
    for path in tensors:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors alike mean a damaged file
            raise InputError(f"weights file {path} is damaged or truncated ({_first_line(exc)})") from exc


def check_model_dir(model_dir: Path, cfg) -> dict:
    """The exported global model's info, refusing a missing folder or one of another profile/size."""
    info_path = Path(model_dir) / MODEL_INFO
    if not Path(model_dir).is_dir():
        raise InputError(f"model folder {model_dir} does not exist (pass --model RUN_DIR/global_model, "
                         "or RUN_DIR/global of a single-site run)")
    if not info_path.is_file():
        raise InputError(f"{model_dir} is not a HistoDiffusion model folder (no {MODEL_INFO})")
    info = _read_json(info_path)
    if info.get("profile") != cfg.profile or info.get("image_size") != cfg.tiles.image_size:
        raise InputError(f"model {model_dir} was trained with profile {info.get('profile')} at "
                         f"{info.get('image_size')} px; this run uses profile {cfg.profile} at {cfg.tiles.image_size} px")
    scale = info.get("scale_factor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise InputError(f"{info_path}: scale_factor must be a positive finite number, got {scale!r}")
    for part in ("autoencoder", "unet"):
        if not (Path(model_dir) / part / "config.json").is_file():
            raise InputError(f"model folder {model_dir} has no {part}/ (an incomplete export?)")
        check_weights_files(Path(model_dir) / part)
    return info


TEST_REPORT = "tile_report_test.json"  # the test folder's own report, beside the training folder's tile_report.json


def shared_tiles(train: TileIndex, test: TileIndex) -> list[tuple[str, str]]:
    """(training tile, test tile) pairs with identical contents; only files of equal byte size are hashed."""

    def by_size(index: TileIndex) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for rel, _ in index.entries:
            out.setdefault(os.stat(index.root / rel).st_size, []).append(rel)
        return out

    a, b = by_size(train), by_size(test)
    pairs = []
    for size in sorted(set(a) & set(b)):
        seen = {sha256_of(train.root / rel): rel for rel in a[size]}
        pairs += [(seen[h], rel) for rel in b[size] if (h := sha256_of(test.root / rel)) in seen]
    return pairs


def check_held_out(labeled: TileFolder, testset: TileFolder, data: Path, test: Path, allow: bool) -> None:
    """Refuse (or, when allowed, warn about) test tiles that are also training tiles: the test set must be held out."""
    try:
        pairs = shared_tiles(labeled.index, testset.index)
    except OSError as exc:
        raise InputError(f"cannot compare the test tiles with the training tiles ({_first_line(exc)})") from exc
    if not pairs:
        return
    same = labeled.index.root == testset.index.root
    what = (f"test folder {test} is the training folder {data}" if same else
            f"test folder {test} shares {len(pairs)} of {len(testset)} tiles with the training folder {data} "
            f"(identical files, first: {pairs[0][1]} = {pairs[0][0]})")
    if not allow:
        raise InputError(f"{what}; the test set must be held out: remove them, or pass --allow-overlap "
                         "(augment.allow_overlap=true) to go on with a warning")
    log.warning("%s; going on because augment.allow_overlap is true: test metrics will be optimistic", what)


def split_groups(groups: list[str | None], positions: list[int]) -> tuple[int, int]:
    """(named groups, tiles without a group) among ``positions``."""
    named = {groups[i] for i in positions if groups[i] is not None}
    return len(named), sum(groups[i] is None for i in positions)


def log_split_by_group(index: TileIndex, groups: list[str | None], train_idx: list[int], val_idx: list[int]) -> None:
    """One line when the validation split was made by slide (some group holds more than one tile)."""
    named = [g for g in groups if g is not None]
    if len(set(named)) == len(named):
        return  # every tile its own group: the per-tile split
    (g_tr, loose_tr), (g_va, loose_va) = split_groups(groups, train_idx), split_groups(groups, val_idx)
    loose = f" (+ {loose_tr} and {loose_va} tiles without one)" if loose_tr or loose_va else ""
    log.info("validation split by slide (groups from %s): %d slide(s) with %d tiles for training, %d slide(s) with "
             "%d tiles for validation%s; no slide on both sides", index.groups_source, g_tr, len(train_idx), g_va,
             len(val_idx), loose)


def load_inputs(cfg, data: Path, test: Path, model_dir: Path, work_dir: Path) -> LabeledInputs:
    info = check_model_dir(model_dir, cfg)
    size, pixels = cfg.tiles.image_size, cfg.tiles.max_image_pixels
    labeled = TileFolder.open(data, TileOptions(size, max_image_pixels=pixels), work_dir=work_dir, labeled=True)
    if len(labeled.classes) < 2:
        raise InputError(f"labeled folder {data} has {len(labeled.classes)} class(es) "
                         f"({', '.join(labeled.classes) or 'none'}); at least 2 class sub-folders are needed")
    testset = TileFolder.open(test, TileOptions(size, max_image_pixels=pixels), work_dir=work_dir, labeled=True, report_name=TEST_REPORT)
    if testset.classes != labeled.classes:
        only_train = sorted(set(labeled.classes) - set(testset.classes))
        only_test = sorted(set(testset.classes) - set(labeled.classes))
        raise InputError(f"test folder {test} has other classes than {data}: "
                         f"only in training: {', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}")
    a = cfg.augment
    groups = labeled.groups  # slides or patients where the data says so: each stays on one side of the split
    train_idx, val_idx = carve_validation(labeled.labels, a.val_fraction, a.min_val_per_class, cfg.seed,
                                          labeled.classes, groups=groups)
    log_split_by_group(labeled.index, groups, train_idx, val_idx)
    check_held_out(labeled, testset, data, test, bool(a.allow_overlap))
    return LabeledInputs(labeled, testset, list(labeled.classes), train_idx, val_idx, info)
