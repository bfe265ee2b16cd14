"""Splits that do not leak: where the data knows each tile's slide (or patient), the validation split carved at
the labeled site keeps every slide on one side, the class centroids use the training side only, and the
memorisation guard sees both sides. Plain folders split exactly as before (tile by tile)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from histodiff.data import TileFolder, TileOptions, scan_tiles
from histodiff.data.slide_writing import COLUMNS as MANIFEST_COLUMNS
from histodiff.errors import InputError
from histodiff.evaluation.downstream import carve_validation

CLASSES = ("ADI", "NORM", "TUM")
SLIDES_PER_CLASS, TILES_PER_SLIDE = 5, 4
FRACTION, MIN_VAL = 0.2, 1


def _png(path: Path, colour=(200, 100, 150)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _slides():
    """(class, slide, tile name) for 3 classes x 5 slides x 4 tiles; slide names are unique across classes."""
    return [(c, f"{c.lower()}{s}", f"{c.lower()}{s}_{k}.png") for c in CLASSES for s in range(SLIDES_PER_CLASS)
            for k in range(TILES_PER_SLIDE)]


def _per_tile_split(labels, fraction, min_per_class, seed):
    """The split as it was before groups existed (a copy of the earlier carve_validation), the reference."""
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for c in sorted(by_class):
        members = by_class[c]
        n_val = max(min_per_class, int(round(fraction * len(members))))
        order = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
        val += order[:n_val]
        train += order[n_val:]
    return sorted(train), sorted(val)


def _slides_on_both_sides(groups, train, val) -> set:
    return {groups[i] for i in train} & {groups[i] for i in val}


def _check_split(labels, groups, train, val, n_classes=len(CLASSES)) -> None:
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    assert _slides_on_both_sides(groups, train, val) == set()
    for c in range(n_classes):
        n_val = sum(labels[i] == c for i in val)
        assert n_val >= max(MIN_VAL, round(FRACTION * labels.count(c)))  # the per-class minimum holds
        assert sum(labels[i] == c for i in train) >= 1


def _grouped_vs_per_tile(index, seeds=range(6)) -> None:
    labels, groups = [label for _, label in index.entries], index.tile_groups()
    # today's per-tile split, groups ignored: some slide lands on both sides
    train, val = carve_validation(labels, FRACTION, MIN_VAL, seed=0)
    assert _slides_on_both_sides(groups, train, val)
    for seed in seeds:  # ours: never
        train, val = carve_validation(labels, FRACTION, MIN_VAL, seed, groups=groups)
        _check_split(labels, groups, train, val)
        assert carve_validation(labels, FRACTION, MIN_VAL, seed, groups=groups) == (train, val)  # deterministic
        # 5 slides of 4 tiles per class, 20% to validation: exactly one slide per class
        assert [sum(labels[i] == c for i in val) for c in range(3)] == [4, 4, 4]
    splits = {tuple(carve_validation(labels, FRACTION, MIN_VAL, s, groups=groups)[1]) for s in seeds}
    assert len(splits) > 1  # the seed still chooses which slides


# ------------------------------------------------------------------------------------------- where groups come from


def test_class_slide_folders_give_slide_groups(tmp_path: Path) -> None:
    for c, slide, name in _slides():
        _png(tmp_path / "data" / c / slide / name)
    index = scan_tiles(tmp_path / "data", work_dir=tmp_path / "work", labeled=True)
    assert index.groups_source == "folders" and index.group_count() == 15
    assert dict(zip((rel for rel, _ in index.entries), index.groups))["TUM/tum3/tum3_1.png"] == "tum3"
    report = json.loads((tmp_path / "work" / "tile_report.json").read_text())
    assert (report["groups"], report["groups_source"], report["tiles_without_group"]) == (15, "folders", 0)
    _grouped_vs_per_tile(index)


def test_labels_csv_group_column(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = []
    for n, (c, slide, _) in enumerate(_slides()):
        _png(data / f"t{n:03d}.png")  # one flat folder: only the CSV knows the slide
        rows.append((f"t{n:03d}.png", c, f"patient-{slide}"))
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "group"), *rows])
    index = scan_tiles(data, labels_csv=labels, work_dir=tmp_path / "work")
    assert index.groups_source == f"csv:{labels.resolve()}" and index.group_count() == 15
    _grouped_vs_per_tile(index)
    # the group column is optional: without it every tile is its own group, as before
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *(r[:2] for r in rows)])
    plain = scan_tiles(data, labels_csv=labels, work_dir=tmp_path / "work")
    assert plain.groups_source == "none" and plain.group_count() == 0 and set(plain.groups) == {None}


def test_a_tile_with_two_groups_in_the_csv_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,group\na.png,TUM,p1\na.png,TUM,p2\n")
    with pytest.raises(InputError, match="two groups"):
        scan_tiles(tmp_path, labels_csv=labels)


def test_slides_manifest_gives_the_slides(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = []
    for c, slide, name in _slides():
        rel = f"{c}/{name}"  # class folders without a slide folder: only the manifest knows the slide
        _png(data / rel)
        rows.append({"slide": slide, "path": rel, "level": 0, "x": 0, "y": 0, "mpp": "", "tissue": 1.0, "label": c})
    with open(data / "manifest.csv", "w", newline="") as fh:  # as python -m histodiff.slides writes it
        writer = csv.DictWriter(fh, fieldnames=[*MANIFEST_COLUMNS, "label"])
        writer.writeheader()
        writer.writerows(rows)
    index = scan_tiles(data, work_dir=tmp_path / "work", labeled=True)
    assert index.classes == list(CLASSES)
    assert index.groups_source == f"manifest:{(data / 'manifest.csv').resolve()}" and index.group_count() == 15
    _grouped_vs_per_tile(index)
    # the groups are cached with the index, and a changed manifest is read again
    again = scan_tiles(data, work_dir=tmp_path / "work", labeled=True)
    assert again.groups == index.groups and again.groups_source == index.groups_source
    (data / "manifest.csv").write_text("slide,path\nonly,ADI/adi0_0.png\n")
    changed = scan_tiles(data, work_dir=tmp_path / "work", labeled=True)
    assert changed.group_count() == 1 and sum(g is None for g in changed.groups) == len(changed.entries) - 1


def test_an_old_index_cache_is_rebuilt_with_groups(tmp_path: Path) -> None:
    for c, slide, name in _slides()[:8]:
        _png(tmp_path / "data" / c / slide / name)
    work = tmp_path / "work"
    work.mkdir()
    (work / "tile_index.json").write_text(json.dumps({"version": 1, "indexes": {}}))
    index = scan_tiles(tmp_path / "data", work_dir=work)
    assert index.group_count() == 2
    cache = json.loads((work / "tile_index.json").read_text())
    assert cache["version"] == 2 and [e["groups"] for e in cache["indexes"].values()] == [index.groups]


# ------------------------------------------------------------------------------------------- the split


def test_plain_folders_split_exactly_as_before(tmp_path: Path) -> None:
    for c, _, name in _slides():
        _png(tmp_path / c / name)  # <class>/tile.png: no slide known
    index = scan_tiles(tmp_path, labeled=True)
    labels, groups = [label for _, label in index.entries], index.tile_groups()
    assert index.groups_source == "none" and set(groups) == {None}
    for seed in range(5):
        for fraction, minimum in ((0.2, 1), (0.1, 3), (0.5, 1), (0.0, 2)):
            expected = _per_tile_split(labels, fraction, minimum, seed)
            assert carve_validation(labels, fraction, minimum, seed, groups=groups) == expected
            assert carve_validation(labels, fraction, minimum, seed) == expected
    odd = [0] * 10 + [1] * 5 + [2] * 3 + [1, 0, 2, 2, 0]  # unsorted labels, uneven classes
    for seed in range(5):
        assert carve_validation(odd, 0.3, 1, seed, groups=[None] * len(odd)) == _per_tile_split(odd, 0.3, 1, seed)
        # distinct groups of one tile each are no groups at all
        assert carve_validation(odd, 0.3, 1, seed, groups=[f"s{i}" for i in range(len(odd))]) == \
            _per_tile_split(odd, 0.3, 1, seed)


def test_uneven_slides_and_slides_holding_several_classes() -> None:
    gen = torch.Generator().manual_seed(1)
    labels, groups = [], []
    for slide in range(12):  # a patient's slide holds tissue of several classes, 1-9 tiles each
        for c in range(3):
            for _ in range(int(torch.randint(0, 10, (1,), generator=gen))):
                labels.append(c)
                groups.append(f"p{slide}")
    for seed in range(10):
        train, val = carve_validation(labels, FRACTION, MIN_VAL, seed, groups=groups)
        _check_split(labels, groups, train, val)


def test_a_class_on_one_slide_cannot_be_split_by_slide() -> None:
    labels = [0] * 6 + [1] * 6
    groups = ["a"] * 3 + ["b"] * 3 + ["c"] * 6  # class 1 lies on slide c alone
    with pytest.raises(InputError, match=r"class TUM: its 6 labeled tile\(s\) lie in 1 slide"):
        carve_validation(labels, 0.2, 1, 0, ["ADI", "TUM"], groups=groups)
    # a class too small for the split is refused as before, with or without groups
    with pytest.raises(InputError, match="class TUM has 1 labeled tile"):
        carve_validation([0, 0, 0, 1], 0.2, 1, 0, ["ADI", "TUM"], groups=["a", "a", "b", "c"])


def test_the_labeled_site_splits_by_slide_and_says_so(tmp_path: Path, monkeypatch, caplog) -> None:
    from histodiff.config import compose
    from histodiff.labeled_site import inputs

    for c, slide, name in _slides():
        _png(tmp_path / "labeled" / c / slide / name)
    for c in CLASSES:
        _png(tmp_path / "test" / c / "t.png", colour=(10, 20, 30))
    monkeypatch.setattr(inputs, "check_model_dir", lambda model_dir, cfg: {})  # no model needed for the split
    cfg = compose(["profile=tiny", "tiles.image_size=32"])
    with caplog.at_level(logging.INFO, logger="histodiff.augment"):
        inp = inputs.load_inputs(cfg, tmp_path / "labeled", tmp_path / "test", tmp_path / "model", tmp_path / "work")
    groups, labels = inp.labeled.groups, inp.labeled.labels
    _check_split(labels, groups, inp.train_idx, inp.val_idx)
    lines = [r.getMessage() for r in caplog.records if "validation split by slide" in r.getMessage()]
    assert len(lines) == 1 and "12 slide(s) with 48 tiles for training, 3 slide(s) with 12 tiles for validation" \
        in lines[0] and "folders" in lines[0]
    # the subsets a pipeline builds see the same groups
    val = TileFolder(inp.labeled.index, TileOptions(8), subset=inp.val_idx)
    assert set(val.groups) == {groups[i] for i in inp.val_idx}


# ------------------------------------------------------------------------------------------- selection


def test_centroids_use_the_training_side_and_the_guard_both_sides() -> None:
    from histodiff.selection.candidate_features import score_features

    # 3 slides of class 0 and 3 of class 1, 2 tiles each; slides 2 and 5 are the validation side
    labels = [0] * 6 + [1] * 6
    groups = [f"s{i // 2}" for i in range(12)]
    train, val = carve_validation(labels, 0.34, 1, seed=0, groups=groups)
    val_slides = {groups[i] for i in val}
    assert val_slides and not val_slides & {groups[i] for i in train}
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 4, generator=gen) + torch.tensor(labels).unsqueeze(1).float() * 10
    pix = torch.randint(0, 256, (12, 3, 8, 8), generator=gen, dtype=torch.uint8)
    cand_pix = torch.randint(0, 256, (3, 3, 8, 8), generator=gen, dtype=torch.uint8)
    cand_pix[1], cand_pix[2] = pix[val[0]], pix[train[0]]  # copies of a validation tile and of a training tile
    cand_feats = torch.randn(3, 4, generator=gen) * 50
    target = torch.tensor([0, 1, 0])
    probs = torch.full((3, 2), 0.5)

    def score(real_feats):
        return score_features(real_feats, torch.tensor(labels), pix, train, cand_feats, probs, cand_pix, target, 2)

    s = score(feats)
    assert s["centroid_positions"].tolist() == sorted(train)
    assert not set(s["centroid_positions"].tolist()) & set(val)  # no tile of a validation slide
    expected = torch.stack([feats[[i for i in train if labels[i] == c]].mean(0) for c in range(2)])
    torch.testing.assert_close(s["centroids"], expected)
    moved = feats.clone()
    moved[val] += 1000.0  # whatever the validation slides look like, the centroids do not move
    torch.testing.assert_close(score(moved)["centroids"], s["centroids"])
    # the guard: a copy of a validation tile is as memorised as a copy of a training tile
    assert s["pixel_nn"][1] == 0 and s["pixel_nn"][2] == 0 and s["pixel_nn"][0] > 0.1
    with pytest.raises(ValueError, match="training positions"):
        score_features(feats, torch.tensor(labels), pix, [], cand_feats, probs, cand_pix, target, 2)
