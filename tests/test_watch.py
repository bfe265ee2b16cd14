"""Learning you can watch (histodiff/evaluation/watch.py): labelled grids, the callback's PNGs and numbers at the
right steps, the federated round's figures, FID/KID on a tiny set, the config keys' checks."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histodiff.config import ConfigError, compose
from histodiff.evaluation.watch import WatchCallback, kid_small, labelled_grid, watch_callback, watch_split

TINY = ["profile=tiny", "weights.perceptual=random", "weights.inception=random", "tiles.image_size=32",
        "tiles.batch_size=4", "train.progress=false", "train.log_every=1", "train.watch_tiles=4", "train.watch_grid=4",
        "train.watch_ddim_steps=2", "lae.block_out_channels=[8,16,16]", "dm.unet.block_out_channels=[16,16,16]"]
SIZE, PAD = 32, 2


def _u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _layout(img: Image.Image, rows: int, ncol: int) -> tuple[int, int]:
    """(left edge of the tiles = margin width, top of the first row) of a labelled grid."""
    return img.width - ncol * (SIZE + PAD) - PAD, img.height - rows * (SIZE + PAD) - PAD + PAD


def _ink(img: Image.Image, box) -> int:
    """Dark pixels (text) inside ``box``."""
    return int((np.asarray(img.crop(box).convert("L")) < 128).sum())


def test_labelled_grid_draws_each_label_on_the_margin(tmp_path):
    real, fake = torch.rand(3, 3, SIZE, SIZE) * 2 - 1, torch.zeros(3, 3, SIZE, SIZE)
    img = labelled_grid([("real", real), ("synthetic", fake)], tmp_path / "g.png", ncol=4)
    assert Image.open(tmp_path / "g.png").size == img.size
    margin, top = _layout(img, 2, 4)
    assert img.height == 2 * (SIZE + PAD) + PAD and margin > 20
    # the tiles sit where the layout says (the 4th cell of each row is blank: fewer tiles than columns)
    assert np.array_equal(np.asarray(img)[top:top + SIZE, margin:margin + SIZE], _u8(real[0]))
    assert (np.asarray(img)[top:top + SIZE, margin + 3 * (SIZE + PAD):][:, :SIZE] == 255).all()
    # the label text is in the margin: an unlabelled grid of the same tiles is white there
    blank = labelled_grid([("", real), ("", fake)], ncol=4)
    rows = [(0, top + r * (SIZE + PAD), margin, top + r * (SIZE + PAD) + SIZE) for r in range(2)]
    assert _ink(blank, (0, 0, blank.width - 4 * (SIZE + PAD) - PAD, blank.height)) == 0
    assert all(_ink(img, box) > 10 for box in rows)
    assert not np.array_equal(np.asarray(img.crop(rows[0])), np.asarray(img.crop(rows[1])))  # two different words


def test_labeled_site_class_grid_says_real_and_synthetic(tmp_path):
    from histodiff.evaluation.table1 import class_grid

    real, syn = torch.rand(2, 3, SIZE, SIZE) * 2 - 1, torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    path = class_grid(real, syn, 4, tmp_path / "TUM.png", title="TUM")
    img = Image.open(path).convert("RGB")
    expect = labelled_grid([("real", real), ("synthetic", syn)], title="TUM", ncol=4)
    assert np.array_equal(np.asarray(img), np.asarray(expect))
    margin, top = _layout(img, 2, 4)
    assert _ink(img, (0, top, margin, top + SIZE)) > 10 and _ink(img, (0, top + SIZE + PAD, margin, img.height)) > 10


def test_fid_and_kid_on_a_tiny_set_are_finite():
    from histodiff.evaluation.fid import fid, inception_features
    from histodiff.evaluation.inception import load_inception

    cfg = compose(TINY)
    net = load_inception(cfg.weights)
    gen = torch.Generator().manual_seed(0)
    real = inception_features(net, [torch.rand(6, 3, SIZE, SIZE, generator=gen) * 2 - 1])
    fake = inception_features(net, [torch.rand(6, 3, SIZE, SIZE, generator=gen) * 0.2])
    same = kid_small(real, real)
    far = kid_small(real, fake)
    assert all(math.isfinite(v) for v in (fid(real, fake), *same, *far))
    assert far[0] > same[0] and fid(real, fake) > fid(real, real) - 1e-6
    assert far[1] > 0  # subsets of half the set differ from draw to draw
    assert kid_small(real, fake, seed=3) == kid_small(real, fake, seed=3)


def test_watch_split_is_fixed_disjoint_and_unaugmented(phantom_tiles):
    cfg = compose([*TINY, "train.watch_every=5"])
    train, tiles = watch_split(cfg, phantom_tiles)
    train2, tiles2 = watch_split(cfg, phantom_tiles)
    assert torch.equal(tiles, tiles2) and tiles.shape == (4, 3, SIZE, SIZE)
    assert len(train) == len(phantom_tiles) - 4 and train.positions == train2.positions
    assert train.options.augment  # training keeps its flips; the watch tiles are as on disk
    held = set(phantom_tiles.positions) - set(train.positions)
    assert len(held) == 4
    with pytest.raises(ValueError, match="at least 8"):
        watch_split(cfg, torch.utils.data.TensorDataset(torch.zeros(6, 3, SIZE, SIZE)))


def test_watch_data_folder_holds_nothing_out(phantom_tiles, phantom_labeled, tmp_path):
    cfg = compose([*TINY, "train.watch_every=5", f"train.watch_data={phantom_labeled}", f"run_dir={tmp_path}"])
    train, tiles = watch_split(cfg, phantom_tiles)
    assert train is phantom_tiles and tiles.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(tiles, watch_split(cfg, phantom_tiles)[1])


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_lae_watch_every_n_steps_writes_pngs_and_logs(phantom_tiles, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from histodiff.local_training.local_steps import train_lae_steps
    from histodiff.local_training.single_site import make_loggers

    cfg = compose([*TINY, "train.watch_every=2"])
    train, cb = watch_callback(cfg, "lae", phantom_tiles, tmp_path / "watch" / "lae")
    loggers = make_loggers(tmp_path, "lae", 0)
    train_lae_steps(cfg, train, tmp_path / "lae", 3, loggers=loggers, callbacks=[cb])
    names = sorted(p.name for p in (tmp_path / "watch" / "lae").glob("*.png"))
    assert names == ["lae-step-0000002.png", "lae-step-0000003.png"]  # every 2 steps, and the last one
    img = Image.open(tmp_path / "watch" / "lae" / names[0]).convert("RGB")
    margin, top = _layout(img, 2, 4)
    assert img.width == margin + 4 * (SIZE + PAD) + PAD and top > 0  # a title line above two rows of 4 tiles
    assert np.array_equal(np.asarray(img)[top:top + SIZE, margin:margin + SIZE], _u8(cb.tiles[0]))  # "real" = fixed
    rows = _csv(tmp_path / "watch" / "lae" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 3]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("fid", "kid", "kid_std", "psnr"))
    assert cb.figures().keys() == {"watch-lae-fid", "watch-lae-kid", "watch-lae-kid-std", "watch-lae-psnr"}
    # the same numbers reach the Lightning loggers at the global step: CSV and TensorBoard (with the image)
    logged = [r for r in _csv(Path(loggers[0].log_dir) / "metrics.csv") if r.get("watch/lae_fid")]
    assert [int(float(r["step"])) for r in logged] == [2, 3]
    acc = EventAccumulator(loggers[1].log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "watch/lae" in acc.Tags()["images"] and [e.step for e in acc.Images("watch/lae")] == [2, 3]
    assert [e.step for e in acc.Scalars("watch/lae_kid")] == [2, 3]


def test_dm_watch_samples_with_a_fixed_seed(phantom_tiles, tmp_path):
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.dm_module import DMModule
    from histodiff.local_training.local_steps import train_dm_steps

    cfg = compose([*TINY, "train.watch_every=3"])
    ae = build_autoencoder(cfg.lae).eval()
    train, cb = watch_callback(cfg, "dm", phantom_tiles, tmp_path / "watch")
    train_dm_steps(cfg, train, tmp_path / "dm", 3, ae, 1.0, callbacks=[cb])
    assert [h["step"] for h in cb.history] == [3]  # the step-3 watch is also the last: written once
    img = Image.open(tmp_path / "watch" / "dm-step-0000003.png").convert("RGB")
    blank = labelled_grid([("real", cb.tiles), ("", cb.tiles)], title="x", ncol=4)
    margin, top = _layout(img, 2, 4)
    assert _ink(img, (0, top + SIZE + PAD, margin, img.height)) > 10  # "synthetic" is written
    assert _ink(blank, (0, top + SIZE + PAD, blank.width - 4 * (SIZE + PAD) - PAD, blank.height)) == 0
    assert math.isfinite(cb.last["fid"]) and math.isfinite(cb.last["kid"]) and "psnr" not in cb.figures()
    module = DMModule(cfg, ae, 1.0)
    a, which = cb._sample(module, torch.device("cpu"))
    b, _ = cb._sample(module, torch.device("cpu"))
    assert which == "EMA" and a.shape == (4, 3, SIZE, SIZE) and torch.equal(a, b)


def test_federated_round_names_files_by_round_and_reports_figures(phantom_unlabeled, tmp_path):
    from client.task import Site, _with_watch, lae_round
    from histodiff.data.tile_dataset import tile_dataset_from_config
    from histodiff.local_training.local_steps import LocalResult

    cfg = compose([*TINY, "train.watch_every=1", f"data={phantom_unlabeled}", f"work_dir={tmp_path}"])
    site = Site("site0", "unlabeled", phantom_unlabeled, tmp_path, tmp_path / "run")
    first = lae_round(cfg, tile_dataset_from_config(cfg), site, 1, None)
    second = lae_round(cfg, tile_dataset_from_config(cfg), site, 1, None)
    assert first.num_examples == len(tile_dataset_from_config(cfg)) - 4  # the watch tiles stay out of training
    assert math.isfinite(first.metrics["watch-lae-fid"]) and math.isfinite(second.metrics["watch-lae-kid"])
    assert first.metrics["watch-lae-fid"] != second.metrics["watch-lae-fid"]
    names = sorted(p.name for p in (site.state / "watch" / "lae").glob("*.png"))
    assert names == ["lae-round-001-step-0000001.png", "lae-round-002-step-0000002.png"]
    assert [r["round"] for r in _csv(site.state / "watch" / "lae" / "metrics.csv")] == ["1", "2"]
    # under secure aggregation (or DP) the figures stay at the site
    cb = WatchCallback(cfg, "lae", torch.zeros(4, 3, SIZE, SIZE), tmp_path)
    cb.last = cb.history[:] or {"fid": 1.0, "kid": 0.1, "kid_std": 0.0, "psnr": 20.0, "seconds": 0.0}
    cb.history = [cb.last]
    for private, sent in ((cfg, True), (compose([*TINY, "privacy.secagg=true"]), False)):
        result = _with_watch(private, LocalResult({}, {"rec": 1.0}, 10), [cb])
        assert any(k.startswith("watch-") for k in result.metrics) is sent


def test_watch_off_by_default_adds_nothing(phantom_tiles, tmp_path):
    cfg = compose(TINY)
    assert cfg.train.watch_every == 0
    assert watch_callback(cfg, "lae", phantom_tiles, tmp_path) == (phantom_tiles, None)
    with pytest.raises(ValueError, match="phase"):
        WatchCallback(cfg, "sample", torch.zeros(4, 3, SIZE, SIZE), tmp_path)


@pytest.mark.parametrize("override, words", [
    ("train.watch_every=-1", "'train.watch_every' must be >= 0 (0 = off"),
    ("train.watch_every=often", "train.watch_every"),
    ("train.watch_tiles=1", "'train.watch_tiles' must be >= 2"),
    ("train.watch_grid=0", "'train.watch_grid' must be in [1, train.watch_tiles"),
    ("train.watch_grid=64", "'train.watch_grid' must be in [1, train.watch_tiles"),
    ("train.watch_ddim_steps=0", "'train.watch_ddim_steps' must be in [1"),
])
def test_bad_watch_keys_are_refused_with_the_key_named(override, words):
    with pytest.raises(ConfigError) as exc:
        compose(["profile=tiny", override])
    assert words in str(exc.value) and "\n" not in str(exc.value)
