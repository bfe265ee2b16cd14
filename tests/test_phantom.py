"""Phantom H&E tiles: shapes, determinism, site stain styles, the CLI, and that classes overlap."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histodiff.data.phantom_tissue import CLASSES, generate_tile, write_phantom_site
from histodiff.data.stain import render, site_style
from histodiff.data.tile_index import scan_tiles
from histodiff.cli.make_phantom import main


@pytest.mark.parametrize("size", [32, 64])
def test_every_class_gives_uint8_rgb_tiles(size: int) -> None:
    style = site_style(0)
    for label in list(range(len(CLASSES))) + ["tum", "ADI"]:
        tile = generate_tile(label, size, np.random.default_rng(1), style)
        assert tile.shape == (size, size, 3) and tile.dtype == np.uint8
        assert 20 < tile.mean() < 250 and tile.std() > 1  # neither blank nor saturated


def test_tiles_are_deterministic_per_seed() -> None:
    style = site_style(1)
    a = generate_tile("LYM", 48, np.random.default_rng([3, 1]), style)
    assert np.array_equal(a, generate_tile("LYM", 48, np.random.default_rng([3, 1]), style))
    assert not np.array_equal(a, generate_tile("LYM", 48, np.random.default_rng([4, 1]), style))


def test_bad_class_or_size_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown tissue class"):
        generate_tile("BONE", 32, np.random.default_rng(0), site_style(0))
    with pytest.raises(ValueError):
        generate_tile(0, 4, np.random.default_rng(0), site_style(0))


def test_sites_differ_in_stain() -> None:
    styles = [site_style(k) for k in range(4)]
    assert site_style(2) == styles[2]  # deterministic per site id
    assert len({s.h_vec for s in styles}) == 4 and len({s.e_vec for s in styles}) == 4
    for s in styles:
        assert np.isclose(np.linalg.norm(s.h_vec), 1) and np.isclose(np.linalg.norm(s.e_vec), 1)
    # same tissue, same random draw, different site: the colour differs clearly
    means = [generate_tile("MUS", 32, np.random.default_rng(0), s).reshape(-1, 3).mean(0) for s in styles[:3]]
    assert min(np.abs(means[i] - means[j]).max() for i in range(3) for j in range(i + 1, 3)) > 4
    # Beer-Lambert: no stain gives the background light, more stain gives less light
    zero = np.zeros((2, 2), np.float32)
    assert np.allclose(render(zero, zero, styles[0]), styles[0].background)
    assert (render(zero + 1, zero, styles[0]) < render(zero + 0.5, zero, styles[0])).all()


def test_generation_is_fast() -> None:
    style = site_style(0)
    generate_tile("TUM", 64, np.random.default_rng(0), style)  # warm-up
    start = time.perf_counter()
    for i in range(18):
        generate_tile(i % 9, 64, np.random.default_rng(i), style)
    assert (time.perf_counter() - start) / 18 < 0.05  # a few ms each; loose for a busy shared CPU


def test_write_site_layouts(tmp_path: Path) -> None:
    labeled = write_phantom_site(tmp_path / "lab", per_class=2, size=24, site=3, seed=5, classes=("ADI", "TUM"))
    assert sorted(p.relative_to(labeled).as_posix() for p in labeled.rglob("*.png")) == [
        "ADI/ADI_s3_0.png", "ADI/ADI_s3_1.png", "TUM/TUM_s3_0.png", "TUM/TUM_s3_1.png"]
    with Image.open(labeled / "TUM" / "TUM_s3_1.png") as im:
        assert im.size == (24, 24) and im.mode == "RGB"
        first = np.asarray(im)
    write_phantom_site(tmp_path / "lab", per_class=3, size=24, site=3, seed=5, classes=("ADI", "TUM"))
    assert np.array_equal(np.asarray(Image.open(labeled / "TUM" / "TUM_s3_1.png")), first)  # stable when rerun
    flat = write_phantom_site(tmp_path / "flat", per_class=1, size=24, labeled=False)
    assert sorted(p.name for p in flat.iterdir()) == sorted(f"{c}_s0_0.png" for c in CLASSES)
    index = scan_tiles(tmp_path / "lab")
    assert index.classes == ["ADI", "TUM"] and index.class_counts() == {"ADI": 3, "TUM": 3}


def test_cli_writes_sites(tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path / "one"), "--per-class", "1", "--size", "16", "--site", "2"]) == 0
    assert len(list((tmp_path / "one").rglob("*_s2_0.png"))) == 9
    assert main(["--out", str(tmp_path / "many"), "--per-class", "1", "--size", "16", "--sites", "2",
                 "--unlabeled", "--seed", "3"]) == 0
    assert len(list((tmp_path / "many" / "site1").glob("*_s1_0.png"))) == 9
    out = capsys.readouterr().out
    assert str(tmp_path / "many" / "site1") in out and "unlabeled" in out


@pytest.mark.parametrize("argv", [
    ["--per-class", "2"],
    ["--out", "X", "--per-class", "0"],
    ["--out", "X", "--size", "4"],
    ["--out", "X", "--sites", "2", "--site", "1"],
    ["--out", "X", "--size", "big"],
])
def test_cli_bad_arguments(argv: list[str], capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "X").exists()


def _tiles(sites: list[int], per_class: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for site in sites:
        style = site_style(site)
        for label in range(len(CLASSES)):
            for i in range(per_class):
                xs.append(generate_tile(label, size, np.random.default_rng([seed, site, label, i]), style))
                ys.append(label)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.tensor(ys)


def test_small_classifier_is_well_above_chance_but_not_perfect() -> None:
    """Classes must overlap like real tissue: a small CNN trained on two sites, tested on a third."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        x_train, y_train = _tiles([0, 1], 30, seed=1, size=32)
        x_test, y_test = _tiles([2], 20, seed=2, size=32)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, len(CLASSES)))
        epochs, batch = 10, 32
        opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(x_train) // batch))
        for _ in range(epochs):
            net.train()
            order = torch.randperm(len(x_train))
            for start in range(0, len(x_train), batch):
                idx = order[start:start + batch]
                xb = torch.rot90(x_train[idx], int(torch.randint(0, 4, ())), (2, 3))  # tissue has no orientation
                loss = torch.nn.functional.cross_entropy(net(xb), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    print(f"phantom held-out-site accuracy: {accuracy:.3f}")
    assert 0.3 < accuracy < 0.97
