"""The evidence command's own parts (benchmarks/evidence.py): data preparation, the fixed-seed labeled split and
the report. The experiment itself is hours long (docs/evidence.md); these run in seconds."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from benchmarks import evidence

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_split_is_fixed_by_its_seed_disjoint_and_keeps_two_per_class(tmp_path):
    files = {c: [tmp_path / f"{c}{i}.png" for i in range(40)] for c in ("A", "B")}
    take, rest = evidence._split(files, 0.05, seed=3)
    again, _ = evidence._split(files, 0.05, seed=3)
    other, _ = evidence._split(files, 0.05, seed=4)
    assert take == again and take != other
    for c in files:
        assert len(take[c]) == 2 and not set(take[c]) & set(rest[c]) and len(take[c]) + len(rest[c]) == 40
    take, _ = evidence._split(files, 0.25, seed=3)
    assert all(len(v) == 10 for v in take.values())


def test_phantom_data_pooled_is_the_sites_tiles_and_labeled_is_part_of_the_pool(tmp_path):
    args = evidence.parse(["--unlabeled-per-class", "1", "--pool-per-class", "3", "--labeled-per-class", "1",
                           "--test-per-class", "1"])
    info = evidence.prepare_data(args, tmp_path / "data")
    data = tmp_path / "data"
    assert info["tiles"] == {"sites": [9, 9, 9], "pooled": 27, "pool": 27, "labeled": 9, "test": 9}
    sites = {_digest(f) for f in (data / "sites").rglob("*.png")}
    assert sites == {_digest(f) for f in (data / "pooled").glob("*.png")}  # the same tiles, in one place
    pool = {_digest(f) for f in (data / "pool").glob("*.png")}
    labeled = {_digest(f) for f in (data / "labeled").rglob("*.png")}
    test = {_digest(f) for f in (data / "test").rglob("*.png")}
    assert labeled <= pool and not test & pool and not sites & pool  # test tiles unseen; stain 3 unseen by sites
    assert evidence.prepare_data(args, data) == info  # written once: a rerun reads data.json


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data (the shared sample tiles)")
def test_real_data_split_is_disjoint_and_sites_are_the_three_folders(tmp_path):
    args = evidence.parse(["--data", "real", "--shared", str(SHARED)])
    info = evidence.prepare_data(args, tmp_path / "data")
    data = tmp_path / "data"
    assert len(info["tiles"]["sites"]) == 3 and info["tiles"]["labeled"] + info["tiles"]["test"] == 32
    labeled = {_digest(f) for f in (data / "labeled").rglob("*.png")}
    assert labeled and not labeled & {_digest(f) for f in (data / "test").rglob("*.png")}


def test_folders_mode_needs_its_folders():
    with pytest.raises(SystemExit):
        evidence.parse(["--data", "folders", "--sites", "a", "b"])
    with pytest.raises(SystemExit):
        evidence.parse(["--labeled-fraction", "1.5"])


def _fake_result(accs: dict[str, list[float]]) -> dict:
    classes = ["A", "B"]
    fid = {"fid": 50.0, "kid": 0.02, "per_class": {c: {"fid": 60.0} for c in classes}}
    return {"pipeline": {"settings": {name: {"seeds": {str(i): {"accuracy": a} for i, a in enumerate(v)},
                                             "quota_met": name != "selective_200"} for name, v in accs.items()},
                         "latent_classifier": {"val_accuracy_by_t": {"0": 0.7, "500": 0.4, "999": 0.1}}},
            "measures": {"reconstruction": {"real_accuracy": 0.9, "reconstruction_accuracy": 0.8, "psnr": 20.0,
                                            "lpips": 0.2},
                         "reconstruction_finetuned": {"reconstruction_accuracy": 0.85},
                         "fidelity": {"all candidates": {"phi_agrees": 0.5}, "selective_200": {"phi_agrees": 0.75}},
                         "fid_test": {"all candidates": fid, "selective_200": fid}}}


def test_report_gives_mean_and_std_over_seeds_and_flags_short_quotas(tmp_path):
    args = evidence.parse(["--lae-steps", "10", "profile=tiny"])
    results = {"labeled": _fake_result({"baseline": [0.5, 0.7], "selective_200": [0.6, 0.8]}),
               "federated": _fake_result({"baseline": [0.55, 0.65], "selective_200": [0.7, 0.7]})}
    for r in results.values():  # downstream per-class metrics, and the selected tiles per class
        for name, entry in r["pipeline"]["settings"].items():
            for i, m in enumerate(entry["seeds"].values()):
                m["per_class"] = [{"class": "A", "sensitivity": 0.5 + 0.1 * i}, {"class": "B", "sensitivity": 0.9}]
            entry["fid_report"] = {"per_class": {"A": {"n_fake": 0}, "B": {"n_fake": 7}}}
        r["pipeline"]["settings"]["selective_200"]["seeds"]["0"]["per_class"][1]["sensitivity"] = 0.6
    md = evidence.report(args, {"how": "test data", "tiles": {}}, results, {"labeled-lae": 60.0}, tmp_path)
    assert "| A | 0 | 55.0 | 55.0 | +0.0 |" in md  # A: no synthetic tiles added; mean of 0.5 and 0.6; no change
    assert "| B | 7 | 90.0 | 75.0 | -15.0 |" in md  # B: (0.6 + 0.9) / 2 at selective 200%
    assert "| class | tiles added (selective_200) | baseline | selective_200 | selective_200 - baseline |" in md
    assert "| baseline | 60.0 ± 14.1 | 60.0 ± 7.1 |" in md
    assert "| selective_200 | 70.0 ± 14.1 (quota short) | 70.0 ± 0.0 (quota short) |" in md
    assert "| class fidelity, selective_200 (%) | 75.0 | 75.0 |" in md
    assert "![labeled](pictures/labeled.png)" in md


def test_overrides_may_come_between_options():
    args = evidence.parse(["--data", "folders", "profile=paper", "--sites", "a", "b", "c", "--labeled-pool", "p",
                           "--test", "t"])
    assert args.overrides == ["profile=paper"] and args.sites == ["a", "b", "c"]
    assert evidence.parse(["--seeds", "0", "1"]).overrides == ["profile=small"]  # the default profile


def test_step_times_from_separate_commands_are_merged_not_overwritten(tmp_path):
    evidence.add_time(tmp_path, "labeled-lae", 60.0)  # two commands on the same --out add their steps' times
    evidence.add_time(tmp_path, "federated-pretrain", 120.0)
    evidence.add_time(tmp_path, "labeled-lae", 30.0)  # a resumed step adds up
    assert json.loads((tmp_path / "timings.json").read_text()) == {"labeled-lae": 90.0, "federated-pretrain": 120.0}
    assert evidence.read_times(tmp_path) == {"labeled-lae": 90.0, "federated-pretrain": 120.0}


def test_jobs_run_settings_at_once_and_report_them_all(tmp_path, monkeypatch):
    running, overlap = set(), []
    lock = threading.Lock()

    def fake_pretrain(args, setting, data, out):
        with lock:
            running.add(setting)
            overlap.append(len(running))
        time.sleep(0.3)
        with lock:
            running.discard(setting)
        evidence.add_time(out, f"{setting}-pretrain", 1.0)
        return tmp_path / setting

    def fake_pipeline(args, setting, data, model, out):
        where = tmp_path / "augment" / setting
        where.mkdir(parents=True, exist_ok=True)
        (where / "results.json").write_text('{"settings": {}}')
        return where

    monkeypatch.setattr(evidence, "prepare_data", lambda args, data: {"how": "fake", "tiles": {}})
    monkeypatch.setattr(evidence, "pretrain", fake_pretrain)
    monkeypatch.setattr(evidence, "labeled_pipeline", fake_pipeline)
    monkeypatch.setattr(evidence, "measure", lambda args, setting, *a: {"setting": setting})
    monkeypatch.setattr(evidence, "report", lambda args, info, results, timings, out: f"{sorted(results)} {timings}")
    assert evidence.main(["--out", str(tmp_path / "out"), "--jobs", "3", "--settings", "labeled", "federated",
                          "pooled"]) == 0
    assert max(overlap) >= 2  # at least two settings were pre-training at the same time
    saved = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert list(saved["results"]) == ["labeled", "federated", "pooled"]
    assert {k for k in saved["timings"] if k.endswith("-pretrain")} == {"labeled-pretrain", "federated-pretrain",
                                                                        "pooled-pretrain"}
