"""Tile folder indexing, verification, caching, colour conversion and the Dataset's tensors."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histodiff.data import tile_index as tiles_mod
from histodiff.data.tile_dataset import TileFolder, TileOptions, tile_dataset_from_config
from histodiff.data.tile_index import scan_tiles
from histodiff.data.images import to_uint8_image
from histodiff.errors import InputError


def _png(path: Path, size: tuple[int, int] = (16, 16), colour=(200, 100, 150), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _one_line_naming(exc: pytest.ExceptionInfo, path: Path | str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def _pixels(ds: TileFolder, i: int = 0) -> np.ndarray:
    x, _ = ds[i]
    return to_uint8_image(x)


def test_class_subfolders_scanned_recursively(tmp_path: Path) -> None:
    _png(tmp_path / "TUM" / "a.png")
    _png(tmp_path / "TUM" / "deeper" / "b.PNG")
    _png(tmp_path / "ADI" / "c.jpg")
    Image.new("RGB", (16, 16)).save(tmp_path / "ADI" / "d.TIFF")
    (tmp_path / "ADI" / "notes.txt").write_text("not a tile")
    index = scan_tiles(tmp_path)
    assert index.classes == ["ADI", "TUM"]
    assert index.class_counts() == {"ADI": 2, "TUM": 2}
    labels = dict(index.entries)
    assert labels["TUM/deeper/b.PNG"] == 1 and labels["ADI/d.TIFF"] == 0
    assert index.skipped == []  # the .txt file is not a candidate at all


def test_labels_from_csv(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        _png(data / name)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na.png,STR\nsub/d.png,LYM\nb.png,STR\n")
    index = scan_tiles(data, labels_csv=csv)
    assert index.classes == ["LYM", "STR"]
    assert sorted(index.entries) == [("a.png", 1), ("b.png", 1), ("sub/d.png", 0)]  # c.png is not listed


def test_csv_naming_missing_files_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na.png,STR\nmissing1.png,TUM\nmissing2.png,TUM\n")
    with pytest.raises(InputError) as exc:
        scan_tiles(tmp_path, labels_csv=csv)
    message = _one_line_naming(exc, csv)
    assert "missing1.png" in message and "2 file(s)" in message


def test_unlabeled_and_loose_files(tmp_path: Path) -> None:
    _png(tmp_path / "A" / "a.png")
    _png(tmp_path / "loose.png")
    index = scan_tiles(tmp_path)  # one tile outside a class folder: no labels at all
    assert index.classes == [] and {label for _, label in index.entries} == {-1}
    assert scan_tiles(tmp_path / "A", labeled=False).entries == [("a.png", -1)]
    with pytest.raises(InputError) as exc:
        scan_tiles(tmp_path, labeled=True)
    assert "loose.png" in _one_line_naming(exc, tmp_path)


def test_corrupt_and_fake_images_are_skipped_and_reported(tmp_path: Path) -> None:
    data, work = tmp_path / "data", tmp_path / "work"
    good = _png(data / "A" / "good.png", (32, 32))
    truncated = data / "A" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    (data / "A" / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    (data / "A" / "text.jpg").write_text("this is not a jpeg")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "A" / "cut.jpg", quality=90)
    (data / "A" / "cut.jpg").write_bytes((data / "A" / "cut.jpg").read_bytes()[:1500])  # JPEG verify() misses this
    (data / "A" / "readme.txt").write_text("ignored")
    index = scan_tiles(data, work_dir=work)
    assert index.entries == [("A/good.png", 0)]
    reasons = dict(index.skipped)
    assert set(reasons) == {"A/truncated.png", "A/random.png", "A/text.jpg", "A/cut.jpg"}
    assert "not an image" in reasons["A/text.jpg"]
    report = json.loads((work / "tile_report.json").read_text())
    assert report["tiles"] == 1 and report["skipped_count"] == 4
    assert ["A/random.png", reasons["A/random.png"]] in report["skipped"]


def test_unusable_folders_are_refused(tmp_path: Path) -> None:
    for path, kind in ((tmp_path / "nope", "does not exist"), (_png(tmp_path / "file.png"), "is a file")):
        with pytest.raises(InputError) as exc:
            scan_tiles(path)
        assert kind in _one_line_naming(exc, path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError) as exc:
        TileFolder.open(empty, TileOptions(32))
    _one_line_naming(exc, empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"garbage")
    (broken / "y.png").write_bytes(b"garbage")
    with pytest.raises(InputError) as exc:
        scan_tiles(broken, work_dir=tmp_path / "work")
    message = _one_line_naming(exc, broken)
    assert "2 file(s) skipped" in message and "tile_report.json" in message


def test_colour_modes_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8] = (200, 40, 90, 255)  # opaque top half, fully transparent bottom half (composited on white)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    _png(tmp_path / "grey.png", colour=77, mode="L")
    _png(tmp_path / "la.png", colour=(77, 255), mode="LA")
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(tmp_path / "deep.png")  # 16-bit: 32896/257 = 128
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(tmp_path / "white16.png")
    Image.new("RGB", (16, 16), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    _png(tmp_path / "cmyk.tif", colour=(255, 0, 0, 0), mode="CMYK")  # pure cyan ink
    ds = TileFolder.open(tmp_path, TileOptions(16))
    got = {rel: _pixels(ds, i) for i, (rel, _) in enumerate(ds.index.entries)}
    assert set(got) == {"rgba.png", "grey.png", "la.png", "deep.png", "white16.png", "palette.png", "cmyk.tif"}
    assert (got["rgba.png"][2, 8] == (200, 40, 90)).all() and (got["rgba.png"][13, 8] == 255).all()
    assert (got["grey.png"] == 77).all() and (got["la.png"] == 77).all()
    assert (got["deep.png"] == 128).all() and (got["white16.png"] == 255).all()
    assert (got["palette.png"] == (10, 20, 30)).all()
    assert (got["cmyk.tif"] == (0, 255, 255)).all()


def test_tiny_images_upscaled_degenerate_ones_skipped(tmp_path: Path) -> None:
    _png(tmp_path / "small.png", (12, 10), (10, 200, 30))
    _png(tmp_path / "dot.png", (5, 5))
    _png(tmp_path / "line.png", (200, 1))
    ds = TileFolder.open(tmp_path, TileOptions(64))
    assert [rel for rel, _ in ds.index.entries] == ["small.png"]
    assert {rel for rel, _ in ds.index.skipped} == {"dot.png", "line.png"}
    assert all("too small" in reason for _, reason in ds.index.skipped)
    assert (_pixels(ds) == (10, 200, 30)).all()


def test_decompression_bombs_are_refused_without_touching_pil_state(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png", (8, 8))
    _png(tmp_path / "big.png", (40, 40))  # 1600 pixels: over twice the limit (PIL's error range)
    _png(tmp_path / "bigish.png", (9, 12))  # 108 pixels: between 1x and 2x (PIL only warns there)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = scan_tiles(tmp_path, max_image_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before
    assert index.entries == [("ok.png", -1)]
    assert all("decompression bomb" in reason for _, reason in index.skipped) and len(index.skipped) == 2


def test_hidden_files_and_folders_are_ignored(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / ".b.png")
    _png(tmp_path / ".thumbs" / "c.png")
    index = scan_tiles(tmp_path)
    assert index.entries == [("a.png", -1)] and index.skipped == []


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this platform")
def test_symlinks_out_of_the_root_and_loops_are_not_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _png(root / "A" / "a.png")
    _png(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "A" / "link.png")
    os.symlink(outside, root / "A" / "linkdir")
    os.symlink(root / "A", root / "A" / "loop")  # a folder containing itself
    os.symlink(root, root / "A" / "up")
    index = scan_tiles(root)
    assert index.entries == [("A/a.png", 0)]
    assert {rel for rel, _ in index.skipped} == {"A/link.png", "A/linkdir"}


def test_index_cache_reused_then_rebuilt_when_folder_changes(tmp_path: Path, monkeypatch) -> None:
    data, work = tmp_path / "data", tmp_path / "work"
    _png(data / "A" / "a.png")
    _png(data / "B" / "b.png")
    first = scan_tiles(data, work_dir=work)
    assert (work / "tile_index.json").is_file()

    opened: list[Path] = []
    real_inspect = tiles_mod.inspect_image
    monkeypatch.setattr(tiles_mod, "inspect_image", lambda path, limit: opened.append(path) or real_inspect(path, limit))
    again = scan_tiles(data, work_dir=work)
    assert opened == [] and again.entries == first.entries and again.sizes == [(16, 16), (16, 16)]

    _png(data / "B" / "c.png")
    changed = scan_tiles(data, work_dir=work)
    assert len(opened) == 3 and changed.class_counts() == {"A": 1, "B": 2}
    # a different labels source is a different index in the same cache file
    assert scan_tiles(data, work_dir=work, labeled=False).classes == []


def test_dataset_tensors_labels_and_centre_crop(tmp_path: Path) -> None:
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = (0, 0, 255)
    wide[:, 10:30] = (255, 0, 0)
    wide[:, 30:] = (0, 255, 0)
    (tmp_path / "B").mkdir()
    Image.fromarray(wide).save(tmp_path / "B" / "wide.png")
    _png(tmp_path / "A" / "a.jpg", (50, 50))
    ds = TileFolder.open(tmp_path, TileOptions(20))
    assert len(ds) == 2 and ds.classes == ["A", "B"]
    x, label = ds[1]
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32 and label == 1
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert (to_uint8_image(x) == (255, 0, 0)).all()  # only the central red square survives the crop
    train = TileFolder(ds.index, TileOptions(24, augment=True), subset=[0])
    assert len(train) == 1 and train[0][0].shape == (3, 24, 24)


def test_training_augmentation_rotates_and_flips(tmp_path: Path) -> None:
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:4, :4] = 255  # a marked corner shows the orientation
    Image.fromarray(arr).save(tmp_path / "t.png")
    ds = TileFolder.open(tmp_path, TileOptions(16, augment=True))
    torch.manual_seed(0)
    corners = {tuple(np.argwhere(to_uint8_image(ds[0][0])[..., 0] > 128).min(0)) for _ in range(40)}
    assert len(corners) == 4  # the mark visits all four corners
    plain = TileFolder.open(tmp_path, TileOptions(16))  # augment off: the tile as it is, every time
    assert {tuple(np.argwhere(to_uint8_image(plain[0][0])[..., 0] > 128).min(0)) for _ in range(10)} == {(0, 0)}


def test_tile_changed_after_indexing_raises_input_error(tmp_path: Path) -> None:
    tile = _png(tmp_path / "a.png")
    ds = TileFolder.open(tmp_path, TileOptions(16))
    tile.write_bytes(b"no longer an image")
    with pytest.raises(InputError) as exc:
        ds[0]
    _one_line_naming(exc, tile)


def test_to_uint8_image_inverts_normalisation() -> None:
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    assert (to_uint8_image(x) == img).all()
    assert to_uint8_image(torch.full((3, 2, 2), 5.0)).max() == 255  # out-of-range values are clamped


def test_dataset_from_config(tmp_path: Path, phantom_labeled: Path) -> None:
    from histodiff.config import compose

    cfg = compose([f"data={phantom_labeled}", f"run_dir={tmp_path / 'run'}", "tiles.image_size=32"])
    ds = tile_dataset_from_config(cfg, train=True)
    assert len(ds) == 27 and len(ds.classes) == 9 and ds.augment
    assert (tmp_path / "run" / "tile_index.json").is_file()
    assert not tile_dataset_from_config(cfg, train=False).augment
    cfg.data = None
    with pytest.raises(InputError):
        tile_dataset_from_config(cfg)


def test_real_sample_tiles(shared_data: Path, tmp_path: Path) -> None:
    ds = TileFolder.open(shared_data / "crc-val-he-32", TileOptions(64), work_dir=tmp_path)
    assert len(ds) == 32 and ds.classes == ["ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    x, label = ds[0]
    assert x.shape == (3, 64, 64) and label == 0
