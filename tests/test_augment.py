"""The labeled-site pipeline end to end on tiny models and phantom tiles (and on real tiles when present):
every output file exists and is well formed, a rerun skips every stage, bad inputs fail fast in one line."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from histodiff.config import compose
from histodiff.data.phantom_tissue import write_phantom_site

CLASSES4 = ["ADI", "LYM", "MUC", "TUM"]
TINY = ["profile=tiny", "weights.perceptual=random", "weights.inception=random", "tiles.image_size=32",
        "tiles.batch_size=8", "train.progress=false", "aux_classifier.epochs=1", "downstream.epochs=1",
        "aux_classifier.img_size=32", "downstream.img_size=32", "latent_classifier.steps=4", "augment.decoder_steps=2",
        "dm.ddim_steps=2", "augment.ratios=[0.5,1]", "augment.tau=0.0", "augment.candidates_factor=1.5",
        "augment.latent_eval_timesteps=[0,500,999]", "augment.grid_tiles=4", "augment.sample_batch_size=32",
        "dm.unet.block_out_channels=[8,16,16]", "dm.unet.norm_num_groups=4"]
MANIFEST = {"class", "seed", "guidance_scale", "ddim_steps", "confidence", "dist_to_own_centroid",
            "nearest_other_centroid", "nn_real_feature_dist", "nn_real_pixel_rms", "selected", "why"}


def export_tiny_model(out: Path, overrides: list[str]) -> Path:
    from histodiff.model_files import export_global_model
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.unet import build_unet

    cfg = compose(overrides)
    return export_global_model(out, cfg, build_autoencoder(cfg.lae).eval(), build_unet(cfg).eval(), 1.0)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled_site")
    write_phantom_site(root / "labeled", 5, 32, site=0, seed=0, classes=CLASSES4)
    write_phantom_site(root / "test", 2, 32, site=0, seed=1, classes=CLASSES4)
    export_tiny_model(root / "model", TINY)
    return root


def run_cli(site: Path, out: Path, *extra: str, data=None, test=None, model=None) -> int:
    from client.augment import main

    return main(["--data", str(data or site / "labeled"), "--test", str(test or site / "test"),
                 "--model", str(model or site / "model"), "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def finished(site):
    out = site / "out"
    assert run_cli(site, out) == 0
    return out


def test_every_output_exists_and_is_well_formed(finished):
    out = finished
    for folder in ("decoder", "latent_classifier"):
        assert (out / folder / "config.json").is_file() and list((out / folder).glob("*.safetensors"))
    for folder in ("aux_classifier", "baseline_classifier"):
        assert (out / folder / "model.safetensors").is_file() and (out / folder / "config.json").is_file()
    from diffusers import AutoencoderKL

    from histodiff.guidance.latent_classifier_net import TimeLatentClassifier

    AutoencoderKL.from_pretrained(str(out / "decoder"))
    TimeLatentClassifier.from_pretrained(str(out / "latent_classifier"))

    rows = list(csv.DictReader(open(out / "synthetic" / "manifest.csv")))
    assert MANIFEST <= set(rows[0]) and len(rows) == 4 * 6  # 4 train tiles x top ratio 1 x factor 1.5, per class
    for r in rows:
        assert (out / "synthetic" / r["path"]).is_file() and r["selected"] in ("yes", "no") and r["why"]
        assert r["path"].startswith(r["class"] + "/") and int(r["ddim_steps"]) == 2
    assert len({r["seed"] for r in rows}) == len(rows)

    table = list(csv.DictReader(open(out / "table1.csv")))
    assert [r["setting"] for r in table] == ["baseline", "random_50", "selective_50", "selective_100"]
    for col in ("fid", "accuracy_mean", "f1_mean", "sensitivity_mean", "specificity_mean"):
        assert col in table[0]
    assert table[0]["fid"] == "" and all(0 <= float(r["accuracy_mean"]) <= 1 for r in table)
    md = (out / "table1.md").read_text().splitlines()
    assert md[0] == "| setting | FID | accuracy | F1 | sensitivity | specificity |" and len(md) == 2 + 4
    assert "+ selective 100%" in md[-1] and "+ random 50%" in md[3]

    results = json.loads((out / "results.json").read_text())
    assert set(results["latent_classifier"]["val_accuracy_by_t"]) == {"0", "500", "999"}
    assert results["settings"]["random_50"]["n_synthetic"] == 4 * 2
    assert results["settings"]["selective_50"]["fid_report"]["per_class"].keys() == set(CLASSES4)
    per_class = results["settings"]["baseline"]["seeds"]["0"]["per_class"]
    assert [p["class"] for p in per_class] == CLASSES4 and sum(p["support"] for p in per_class) == 8
    for png in [*(out / "grids").glob("*.png"), *(out / "confusion").glob("*.png")]:
        Image.open(png).load()
    assert {p.stem for p in (out / "grids").glob("*.png")} == set(CLASSES4)
    assert {p.stem for p in (out / "confusion").glob("*.png")} == {r["setting"] for r in table}


def test_rerun_skips_every_stage(site, finished):
    from histodiff.labeled_site.pipeline import run_augment

    before = (finished / "table1.csv").read_text()
    results = run_augment(compose(TINY), site / "labeled", site / "test", site / "model", finished)
    assert results["stages"]["ran"] == [] and "candidates" in results["stages"]["skipped"]
    assert (finished / "table1.csv").read_text() == before
    # a changed selection config reruns only what depends on it
    results = run_augment(compose([*TINY, "augment.tau=0.99"]), site / "labeled", site / "test", site / "model", finished)
    assert "candidates" not in results["stages"]["ran"] and "aux_classifier" not in results["stages"]["ran"]
    assert any(s.startswith("downstream/selective_") for s in results["stages"]["ran"]), results["stages"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_one_class_only_is_refused(site, tmp_path, capsys):
    write_phantom_site(tmp_path / "one", 5, 32, classes=["ADI"])
    assert run_cli(site, tmp_path / "out", data=tmp_path / "one") == 2
    assert "at least 2 class" in _error(capsys) and not (tmp_path / "out" / "aux_classifier").exists()


def test_class_too_small_for_validation_is_refused(site, tmp_path, capsys):
    write_phantom_site(tmp_path / "small", 5, 32, classes=["ADI", "LYM"])
    write_phantom_site(tmp_path / "small2", 1, 32, classes=["MUC"])
    shutil.move(str(tmp_path / "small2" / "MUC"), str(tmp_path / "small" / "MUC"))
    test = tmp_path / "t"
    write_phantom_site(test, 1, 32, classes=["ADI", "LYM", "MUC"])
    assert run_cli(site, tmp_path / "out", data=tmp_path / "small", test=test) == 2
    assert "class MUC has 1 labeled tile" in _error(capsys)


def test_test_classes_must_match(site, tmp_path, capsys):
    write_phantom_site(tmp_path / "t", 1, 32, classes=["ADI", "LYM", "MUC", "STR"])
    assert run_cli(site, tmp_path / "out", test=tmp_path / "t") == 2
    err = _error(capsys)
    assert "only in training: TUM" in err and "only in test: STR" in err


def test_missing_or_foreign_model_is_refused(site, tmp_path, capsys):
    assert run_cli(site, tmp_path / "out", model=tmp_path / "nope") == 2
    assert "does not exist" in _error(capsys)
    other = tmp_path / "other"
    shutil.copytree(site / "model", other)
    info = json.loads((other / "model_info.json").read_text())
    (other / "model_info.json").write_text(json.dumps({**info, "profile": "paper", "image_size": 256}))
    assert run_cli(site, tmp_path / "out", model=other) == 2
    assert "profile paper at 256 px" in _error(capsys)


def test_real_tiles_smoke(tmp_path):
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "crc-val-he-32"
    if not src.is_dir():
        pytest.skip(f"real sample tiles not found at {src}")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    for name in classes:  # a split of its own: 3 labeled tiles per class (2 train + 1 val), 1 test tile
        tiles = sorted((src / name).glob("*.png"))
        for i, tile in enumerate(tiles):
            dest = tmp_path / ("test" if i == len(tiles) - 1 else "labeled") / name
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(tile, dest / tile.name)
    export_tiny_model(tmp_path / "model", TINY)
    from histodiff.labeled_site.pipeline import run_augment

    cfg = compose([*TINY, "augment.ratios=[1]", "augment.random_ratios=[1]", "augment.val_fraction=0.34"])
    results = run_augment(cfg, tmp_path / "labeled", tmp_path / "test", tmp_path / "model", tmp_path / "out")
    assert results["classes"] == classes and results["tiles"] == {"train": 16, "val": 8, "test": 8}
    assert [r["setting"] for r in results["table"]] == ["baseline", "random_100", "selective_100"]
    assert (tmp_path / "out" / "table1.md").is_file() and len(list((tmp_path / "out" / "synthetic").rglob("*.png"))) == 24
