"""Hostile and careless inputs at a site: tile folders with link loops, bombs, truncated and special files;
bad config values and command lines; damaged model folders; test tiles that are training tiles.
Each ends in a skip that is listed, or in one line on stderr (exit code 2) naming the key or the file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histodiff.data import tile_index as tiles_mod
from histodiff.data.tile_dataset import TileFolder, TileOptions
from histodiff.data.tile_index import scan_tiles

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this platform")


def _tile(path: Path, size: int = 16, seed: int = 0) -> Path:
    """A small noise tile; distinct seeds give distinct files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _png_bomb(path: Path, side: int = 100_000) -> Path:
    """A 300-byte PNG whose header claims side x side pixels (1e10 by default): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 256))
                     + chunk(b"IEND", b""))
    return path


def _loops(folder: Path) -> None:
    """Every kind of link that cannot be followed: to itself, two pointing at each other, a dangling one."""
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink("self", folder / "self")
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    os.symlink("gone.png", folder / "dangling.png")


def _one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------ tile folders


@needs_symlinks
def test_symlink_loops_and_dangling_links_are_skipped_listed_and_counted(tmp_path, caplog):
    data, work = tmp_path / "data", tmp_path / "work"
    _tile(data / "A" / "ok.png")
    _tile(data / "B" / "ok.png", seed=1)
    _loops(data / "A")
    os.symlink(data / "B", data / "B" / "deeper")  # a folder loop through a link to a folder already seen
    with caplog.at_level(logging.WARNING, logger="histodiff.data"):
        index = scan_tiles(data, work_dir=work)
    assert [rel for rel, _ in index.entries] == ["A/ok.png", "B/ok.png"] and index.classes == ["A", "B"]
    reasons = dict(index.skipped)
    assert set(reasons) == {"A/self", "A/a.png", "A/b.png", "A/dangling.png"}
    assert "loop" in reasons["A/self"] and "loop" in reasons["A/a.png"] and "dangling" in reasons["A/dangling.png"]
    report = json.loads((work / "tile_report.json").read_text())
    assert report["skipped_count"] == 4 and ["A/self", reasons["A/self"]] in report["skipped"]
    lines = [r.getMessage() for r in caplog.records if r.name == "histodiff.data" and "skipped" in r.getMessage()]
    assert len(lines) == 1 and "skipped 4 of 6 entries" in lines[0] and str(work / "tile_report.json") in lines[0]


def test_an_entry_that_raises_on_stat_is_skipped(tmp_path, monkeypatch):
    """A permission error (or any OSError) on one entry: listed, the rest of the folder is used."""
    _tile(tmp_path / "good.png")
    _tile(tmp_path / "locked" / "x.png", seed=1)
    real_scandir = os.scandir

    class Locked:
        def __init__(self, entry):
            self.name, self.path, self._entry = entry.name, entry.path, entry

        def is_symlink(self):
            return False

        def is_dir(self, follow_symlinks=True):
            raise PermissionError(13, "Permission denied", self.path)

        is_file = is_dir

    def scandir(folder):
        return [Locked(e) if e.name == "locked" else e for e in real_scandir(folder)]

    monkeypatch.setattr(tiles_mod.os, "scandir", scandir)
    index = scan_tiles(tmp_path)
    assert index.entries == [("good.png", -1)]
    assert len(index.skipped) == 1 and index.skipped[0][0] == "locked" and "Permission denied" in index.skipped[0][1]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_named_like_a_tile_is_skipped_not_read(tmp_path):
    _tile(tmp_path / "good.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(index=scan_tiles(tmp_path)), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # opened the FIFO and blocks: unblock it so that the thread can end
        with open(fifo, "wb"):
            pass
        pytest.fail("scanning opened the FIFO and blocked")
    index = result["index"]
    assert index.entries == [("good.png", -1)] and index.skipped[0][0] == "pipe.png"
    assert "not a regular file" in index.skipped[0][1]


def test_bomb_truncated_and_fake_images_are_skipped_with_reasons(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    good = _tile(data / "good.png", 32)
    _png_bomb(data / "bomb.png")  # refused from its header, never decoded
    (data / "truncated.png").write_bytes(good.read_bytes()[:100])
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / "cut.jpg")
    (data / "cut.jpg").write_bytes((data / "cut.jpg").read_bytes()[:1200])
    (data / "empty.tif").write_bytes(b"")
    index = scan_tiles(data, work_dir=work)  # the default limit of 1e8 pixels
    assert index.entries == [("good.png", -1)]
    reasons = dict(index.skipped)
    assert set(reasons) == {"bomb.png", "truncated.png", "cut.jpg", "empty.tif"}
    assert "decompression bomb" in reasons["bomb.png"]
    assert all("\n" not in reason for reason in reasons.values())
    assert json.loads((work / "tile_report.json").read_text())["skipped_count"] == 4


def test_a_folder_of_only_bombs_and_broken_files_is_one_line(tmp_path, capsys, monkeypatch):
    from histodiff.local_training.single_site import STAGES, load_dataset
    from histodiff.cli.train_site import main

    data = tmp_path / "data"
    data.mkdir()
    _png_bomb(data / "bomb.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(STAGES, "lae", lambda cfg, run_dir: load_dataset(cfg))
    assert main(["profile=tiny", f"data={data}", f"run_dir={tmp_path / 'run'}"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "no readable tile" in err and "2 file(s) skipped" in err and "tile_report.json" in err


@needs_symlinks
def test_train_with_a_symlink_loop_says_how_many_were_skipped(tmp_path, capsys, monkeypatch):
    from histodiff.local_training.single_site import STAGES, load_dataset
    from histodiff.cli.train_site import main

    data, run = tmp_path / "data", tmp_path / "run"
    for i in range(3):
        _tile(data / f"t{i}.png", seed=i)
    _loops(data / "sub")
    seen = []
    monkeypatch.setitem(STAGES, "lae", lambda cfg, run_dir: seen.append(len(load_dataset(cfg))))
    assert main(["profile=tiny", f"data={data}", f"run_dir={run}"]) == 0
    assert seen == [3]
    out = capsys.readouterr().out
    assert "skipped 4 of 7 entries" in out and str(run / "tile_report.json") in out


def test_resized_tiles_are_stated_once_per_folder(tmp_path, caplog):
    big, right = tmp_path / "big", tmp_path / "right"
    for i in range(3):
        _tile(big / f"t{i}.png", 256, seed=i)
        _tile(right / f"t{i}.png", 64, seed=i)
    _tile(big / "odd.png", 300, seed=9)
    with caplog.at_level(logging.INFO, logger="histodiff.data"):
        TileFolder.open(big, TileOptions(64))
        TileFolder.open(big, TileOptions(64, augment=True))  # the same folder again: not repeated
        TileFolder.open(right, TileOptions(64))  # already at the profile's size: nothing to say
    lines = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert len(lines) == 1, lines
    assert str(big.resolve()) in lines[0] and "4 of 4 tiles" in lines[0]
    assert "256x256 px (3)" in lines[0] and "300x300 px (1)" in lines[0] and "64x64 px" in lines[0]


# ------------------------------------------------------------------------------------ config values


@pytest.mark.parametrize("override, key", [
    ("tiles.num_workers=-1", "tiles.num_workers"),
    ("lae.lr=-1.0", "lae.lr"),
    ("lae.block_out_channels=[]", "lae.block_out_channels"),
    ("dm.lr=0", "dm.lr"),
    ("lae.lr=nan", "lae.lr"),
    ("dm.unet.block_out_channels=[12,64,64]", "dm.unet.block_out_channels"),
    ("augment.val_fraction=1.5", "augment.val_fraction"),
])
def test_train_refuses_bad_values_in_one_line_before_any_work(tmp_path, capsys, override, key):
    from histodiff.cli.train_site import main

    data, run = tmp_path / "data", tmp_path / "run"
    _tile(data / "t.png")
    # with a usable data folder, so that nothing but the value itself can stop the run
    assert main(["profile=tiny", f"data={data}", f"run_dir={run}", "train.steps=1", "weights.perceptual=random",
                 "train.progress=false", override]) == 2
    assert f"'{key}'" in _one_line(capsys.readouterr().err)
    assert not run.exists()  # stopped before logging, the tile scan or a model


@pytest.mark.parametrize("override, key", [
    ("augment.ratios=[-1]", "augment.ratios"),
    ("augment.random_ratios=[0.5,0]", "augment.random_ratios"),
    ("augment.seeds=[]", "augment.seeds"),
    ("augment.tau=2", "augment.tau"),
    ("augment.latent_eval_timesteps=[0,1000]", "augment.latent_eval_timesteps"),
    ("latent_classifier.block_out_channels=[]", "latent_classifier.block_out_channels"),
    ("dm.ema_decay=1.5", "dm.ema_decay"),
])
def test_config_ranges_are_checked(override, key):
    from histodiff.config import ConfigError, compose

    with pytest.raises(ConfigError) as err:
        compose(["profile=tiny", override])
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_existing_profiles_and_test_overrides_stay_valid():
    from histodiff.config import compose

    compose(["profile=tiny"])
    compose(["profile=paper"])
    compose(["profile=tiny", "augment.random_ratios=[]", "lae.perceptual_weight=0", "lae.disc_start=0",
             "augment.decoder_steps=0", "dm.unet.block_out_channels=[8,16,16]", "dm.unet.norm_num_groups=4",
             "tiles.image_size=32", "augment.ratios=[0.5,1,2,3]", "augment.tau=0.0"])


# ------------------------------------------------------------------------------------ client.run


@pytest.fixture
def site_files(tmp_path):
    data = tmp_path / "site0"
    for i in range(2):
        _tile(data / f"t{i}.png", seed=i)
    ca, key = tmp_path / "ca.crt", tmp_path / "site0.key"
    ca.write_text("not checked here")
    key.write_text("not checked here")
    return {"data": data, "ca": ca, "key": key, "tmp": tmp_path}


@pytest.fixture
def no_exec(monkeypatch):
    """Record the SuperNode command instead of starting it (as a child, or by becoming it)."""
    import client.run

    calls: list[list[str]] = []
    monkeypatch.setattr(client.run, "supervise", lambda cmd, *args, **kwargs: calls.append(cmd) or 0, raising=False)
    monkeypatch.setattr(client.run.os, "execvpe", lambda file, cmd, env: calls.append(cmd))
    return calls


def _run_args(site, *extra: str, data=None, ca=None, key=None) -> list[str]:
    return ["--data", str(data or site["data"]), "--superlink", "127.0.0.1:1", "--root-certificates",
            str(ca or site["ca"]), "--auth-key", str(key or site["key"]), "--work", str(site["tmp"] / "work"), *extra]


@pytest.mark.parametrize("case, words", [
    ("profile", "unknown profile 'huge'"),
    ("unknown key", "unknown config key 'foo'"),
    ("bad value", "'tiles.num_workers'"),
    ("quote", "--overrides"),
    ("not key=value", "--overrides"),
    ("auth key", "--auth-key"),
    ("certificates", "--root-certificates"),
    ("data", "--data"),
    ("test data", "--test-data"),
])
def test_client_run_refuses_bad_arguments_in_one_line(site_files, no_exec, capsys, case, words):
    from client.run import main

    missing = site_files["tmp"] / "missing"
    args = {
        "profile": _run_args(site_files, "--profile", "huge"),
        "unknown key": _run_args(site_files, "--overrides", "foo=1"),
        "bad value": _run_args(site_files, "--overrides", "tiles.num_workers=-1"),
        "quote": _run_args(site_files, "--overrides", "tiles.batch_size=2 'unclosed"),
        "not key=value": _run_args(site_files, "--overrides", "tiles.batch_size"),
        "auth key": _run_args(site_files, key=missing),
        "certificates": _run_args(site_files, ca=missing),
        "data": _run_args(site_files, data=missing),
        "test data": _run_args(site_files, "--role", "labeled", "--test-data", str(missing)),
    }[case]
    assert main(args) == 2
    err = _one_line(capsys.readouterr().err)
    assert words in err
    if case in ("auth key", "certificates", "data", "test data"):
        assert str(missing) in err
    assert no_exec == []  # the SuperNode was never started


@needs_symlinks
def test_client_run_with_a_symlink_loop_starts_and_says_what_it_skipped(site_files, no_exec, capfd):
    from client.run import main

    _loops(site_files["data"] / "sub")
    assert main(_run_args(site_files)) in (None, 0)  # the SuperNode would have been started
    assert len(no_exec) == 1 and no_exec[0][0] == "flower-supernode"
    report = site_files["tmp"] / "work" / "tile_report.json"
    # the tiles are checked in a child process (client.run stays without torch): its log goes to stderr
    err = capfd.readouterr().err
    assert any("skipped 4 of 6 entries" in line and str(report) in line for line in err.splitlines())
    assert json.loads(report.read_text())["skipped_count"] == 4


# ------------------------------------------------------------------------------------ client.augment


SMALL = ["profile=tiny", "tiles.image_size=32", "weights.perceptual=random", "weights.inception=random",
         "train.progress=false", "dm.unet.block_out_channels=[8,16,16]", "dm.unet.norm_num_groups=4"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from histodiff.model_files import export_global_model
    from histodiff.config import compose
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.unet import build_unet

    cfg = compose(SMALL)
    return export_global_model(tmp_path_factory.mktemp("model") / "global_model", cfg,
                               build_autoencoder(cfg.lae).eval(), build_unet(cfg).eval(), 1.0)


@pytest.fixture
def labeled_site(tmp_path):
    for c, name in enumerate(("ADI", "TUM")):
        for i in range(3):
            _tile(tmp_path / "labeled" / name / f"{i}.png", 32, seed=10 * c + i)
        _tile(tmp_path / "test" / name / "t.png", 32, seed=100 + c)
    return tmp_path


@pytest.fixture
def inputs_only(monkeypatch):
    """The pipeline stops after its input checks: no weights, no training; table1.md is a stub."""
    from histodiff.labeled_site import pipeline

    monkeypatch.setattr(pipeline, "_check_weights", lambda cfg: None)

    def run(self):
        (self.out / "table1.md").write_text("inputs checked\n")
        return {}

    monkeypatch.setattr(pipeline.Pipeline, "run", run)


def _augment(site: Path, model: Path, *extra: str, data=None, test=None) -> int:
    from client.augment import main

    return main(["--data", str(data or site / "labeled"), "--test", str(test or site / "test"), "--model", str(model),
                 "--out", str(site / "out"), *SMALL, *extra])


def _broken_model(tiny_model: Path, where: Path, damage) -> Path:
    model = where / "global_model"
    shutil.copytree(tiny_model, model)
    damage(model)
    return model


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case, named", [
    ("garbage info", "model_info.json"),
    ("info not an object", "model_info.json"),
    ("no scale factor", "model_info.json"),
    ("missing autoencoder weights", "autoencoder"),
    ("truncated unet weights", "unet/diffusion_pytorch_model.safetensors"),
    ("garbage unet config", "unet/config.json"),
])
def test_augment_refuses_a_damaged_model_folder_before_any_work(labeled_site, tiny_model, capsys, case, named):
    damage = {
        "garbage info": lambda m: (m / "model_info.json").write_text("{not json"),
        "info not an object": lambda m: (m / "model_info.json").write_text("[1, 2]"),
        "no scale factor": lambda m: (m / "model_info.json").write_text(json.dumps(
            {**json.loads((m / "model_info.json").read_text()), "scale_factor": "NaN"})),
        "missing autoencoder weights": lambda m: (m / "autoencoder" / "diffusion_pytorch_model.safetensors").unlink(),
        "truncated unet weights": lambda m: _truncate(m / "unet" / "diffusion_pytorch_model.safetensors"),
        "garbage unet config": lambda m: (m / "unet" / "config.json").write_text("\x00\x01 not json"),
    }[case]
    model = _broken_model(tiny_model, labeled_site, damage)
    assert _augment(labeled_site, model) == 2
    err = _one_line(capsys.readouterr().err)
    assert named in err and str(model) in err
    out = labeled_site / "out"
    assert not (out / "aux_classifier").exists() and not (out / "work" / "tile_index.json").exists()


def test_load_global_model_names_the_damaged_folder(tiny_model, tmp_path):
    from histodiff.model_files import load_global_model
    from histodiff.config import compose
    from histodiff.errors import InputError

    model = _broken_model(tiny_model, tmp_path, lambda m: _truncate(m / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(InputError) as err:
        load_global_model(model, compose(SMALL))
    assert str(model / "unet") in str(err.value) and "\n" not in str(err.value)


def test_augment_refuses_the_training_folder_as_test_folder(labeled_site, tiny_model, inputs_only, capsys):
    assert _augment(labeled_site, tiny_model, test=labeled_site / "labeled") == 2
    err = _one_line(capsys.readouterr().err)
    assert "is the training folder" in err and "--allow-overlap" in err
    assert not (labeled_site / "out" / "table1.md").exists()


def test_augment_refuses_test_tiles_copied_from_training(labeled_site, tiny_model, inputs_only, capsys):
    shutil.copy(labeled_site / "labeled" / "TUM" / "2.png", labeled_site / "test" / "TUM" / "copy.png")
    assert _augment(labeled_site, tiny_model) == 2
    err = _one_line(capsys.readouterr().err)
    assert "shares 1 of 3 tiles" in err and "TUM/copy.png = TUM/2.png" in err


def test_allow_overlap_turns_the_refusal_into_a_warning(labeled_site, tiny_model, inputs_only, capsys):
    shutil.copy(labeled_site / "labeled" / "TUM" / "2.png", labeled_site / "test" / "TUM" / "copy.png")
    assert _augment(labeled_site, tiny_model, "--allow-overlap") == 0
    out = capsys.readouterr().out
    assert "shares 1 of 3 tiles" in out and "WARNING" in out and "inputs checked" in out


def test_each_folder_keeps_its_own_tile_report(labeled_site, tiny_model, inputs_only):
    (labeled_site / "test" / "TUM" / "broken.png").write_bytes(b"not a png")
    assert _augment(labeled_site, tiny_model) == 0
    work = labeled_site / "out" / "work"
    train_report = json.loads((work / "tile_report.json").read_text())
    assert train_report["root"] == str((labeled_site / "labeled").resolve()) and train_report["tiles"] == 6
    test_report = json.loads((work / "tile_report_test.json").read_text())
    assert test_report["root"] == str((labeled_site / "test").resolve()) and test_report["skipped_count"] == 1


@needs_symlinks
def test_augment_with_a_symlink_loop_goes_on(labeled_site, tiny_model, inputs_only, capsys):
    _loops(labeled_site / "labeled" / "ADI")
    _loops(labeled_site / "test" / "TUM")
    assert _augment(labeled_site, tiny_model) == 0
    out = capsys.readouterr().out
    work = labeled_site / "out" / "work"
    assert f"listed in {work / 'tile_report.json'}" in out and f"listed in {work / 'tile_report_test.json'}" in out


def test_help_names_the_real_model_paths(capsys):
    from client.augment import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "global_model" in out and "RUN_DIR/global " in out.replace("\n", " ")


def test_histodiff_debug_shows_the_traceback(tmp_path, monkeypatch):
    from histodiff.config import ConfigError
    from histodiff.cli.train_site import main

    monkeypatch.setenv("HISTODIFF_DEBUG", "1")
    with pytest.raises(ConfigError, match="lae.lr"):
        main(["profile=tiny", "lae.lr=-1.0", f"run_dir={tmp_path / 'run'}"])
