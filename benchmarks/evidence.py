"""The evidence experiment (issue 12): does pre-training across sites, then guided and selected synthetic tiles at
the labeled site, make a classifier better? One command, resumable (rerun it to continue where it stopped)::

    python -m benchmarks.evidence --out runs/evidence                      # phantom tiles, `small` profile
    python -m benchmarks.evidence --out runs/evidence-real --data real     # smoke test on ../shared/data
    python -m benchmarks.evidence --out runs/evidence-paper --data folders profile=paper \\
        --sites /data/siteA /data/siteB /data/siteC --labeled-pool /data/NCT-CRC-HE-100K \\
        --labeled-fraction 0.05 --test /data/CRC-VAL-HE-7K                  # the paper's Table 1 setting, on GPUs

Three pre-training settings, each processing the same number of tiles (compute-matched):

- ``labeled``: the labeled site alone pre-trains the LAE and the DM on its own pool of tiles (labels unused);
- ``federated``: three unlabeled sites (own stains; the labeled site unseen) in Flower's simulation runtime, FedAvg,
  each site taking a third of the steps per round (``python -m server.run --simulation 3``);
- ``pooled``: the three sites' tiles pooled at one place (the upper bound the federation tries to reach).

Then, for each, the labeled-site pipeline (``python -m client.augment``: decoder fine-tuning, latent classifier,
guided candidates, selection, downstream classifiers over ``--seeds``) on a low-label split of the labeled pool,
tested on held-out tiles; and the measurements the pipeline does not make itself: reconstruction figures (the
site's auxiliary classifier phi on real vs reconstructed test tiles, PSNR, LPIPS; before and after decoder
fine-tuning), class fidelity (phi's agreement with the target class on every candidate and on each selected set)
and FID/KID per class against the test tiles, which no model saw. Writes ``OUT/evidence.json``, ``OUT/evidence.md``
and the pictures ``OUT/pictures/<setting>.png``; ``--report FILE`` copies the markdown (and pictures) for the docs.
Every step runs as its own process with its log under ``OUT/logs/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SETTINGS = {
    "labeled": "(a) labeled site alone",
    "federated": "(b) federated, 3 unlabeled sites",
    "pooled": "(c) 3 sites pooled at one place",
}
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evidence", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="runs/evidence", help="run folder (rerun the same command to resume)")
    p.add_argument("--data", choices=("phantom", "real", "folders"), default="phantom")
    p.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="downstream seeds (mean +- std)")
    p.add_argument("--lae-steps", type=int, default=None, help="LAE steps (default: the profile's train.steps)")
    p.add_argument("--dm-steps", type=int, default=1500, help="DM steps")
    p.add_argument("--lae-rounds", type=int, default=8, help="federated LAE rounds (steps split over rounds and sites)")
    p.add_argument("--dm-rounds", type=int, default=10, help="federated DM rounds")
    # phantom data: a labeled site (stain 3) with a pool, a low-label split of it and a held-out test set
    p.add_argument("--unlabeled-per-class", type=int, default=150, help="phantom: tiles per class at each unlabeled site")
    p.add_argument("--pool-per-class", type=int, default=100, help="phantom: the labeled site's pool per class")
    p.add_argument("--labeled-per-class", type=int, default=10, help="phantom: labeled tiles per class (10%% of the pool)")
    p.add_argument("--test-per-class", type=int, default=40, help="phantom: held-out test tiles per class")
    # real / folder data
    p.add_argument("--shared", default="../shared/data", help="real: the shared sample data folder")
    p.add_argument("--sites", nargs="*", default=[], help="folders: the unlabeled sites' tile folders (3)")
    p.add_argument("--labeled-pool", default=None, help="folders: the labeled site's tiles in class folders")
    p.add_argument("--labeled-fraction", type=float, default=0.05, help="folders: labeled share of the pool")
    p.add_argument("--split-seed", type=int, default=0, help="folders/real: seed of the labeled split")
    p.add_argument("--test", default=None, help="folders: held-out test tiles in class folders")
    p.add_argument("--report", default=None, help="also write the markdown here (pictures beside it)")
    p.add_argument("--watch-every", type=int, default=400,
                   help="single-site pre-training: watch grids + FID/KID every N steps (train.watch_every; 0: off). "
                        "The federated setting is not watched (it would watch at every site every round)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1,
                   help="settings run at once (each its own processes; with --threads 1, one core each keeps a "
                        "2-core machine busier than one 2-thread process)")
    p.add_argument("overrides", nargs="*", help="config overrides for every step, e.g. profile=paper")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come between options
    if not any(o.startswith("profile=") for o in args.overrides):
        args.overrides.insert(0, "profile=small")
    if args.data == "folders" and (len(args.sites) < 2 or not args.labeled_pool or not args.test):
        p.error("--data folders needs --sites (2 or more), --labeled-pool and --test")
    if not 0 < args.labeled_fraction < 1:
        p.error(f"--labeled-fraction must be in (0, 1), got {args.labeled_fraction}")
    if args.watch_every < 0:
        p.error("--watch-every must be >= 0 (0: off)")
    for name in ("dm_steps", "lae_rounds", "dm_rounds", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} evidence: {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- data

def _link(src: Path, dst: Path) -> None:
    """A hard link (a regular file inside the data folder; tile scans refuse symlinks that lead outside), or a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SystemExit(f"error: {root}: no class sub-folders")
    return {c: sorted(f for f in (root / c).rglob("*") if f.suffix.lower() in IMAGE_EXT) for c in classes}


def _split(files: dict[str, list[Path]], fraction: float, seed: int, least: int = 2) -> tuple[dict, dict]:
    """Per class, a fixed-seed share ``fraction`` (at least ``least`` tiles) and the rest."""
    import random

    take, rest = {}, {}
    for c, fs in files.items():
        order = fs[:]
        random.Random(f"{seed}-{c}").shuffle(order)
        k = min(len(order), max(least, round(fraction * len(order))))
        take[c], rest[c] = sorted(order[:k]), sorted(order[k:])
    return take, rest


def _link_classes(files: dict[str, list[Path]], out: Path, flat: bool = False) -> None:
    for c, fs in files.items():
        for f in fs:
            _link(f, out / (f"{c}_{f.name}" if flat else f"{c}/{f.name}"))


def prepare_data(args, data: Path) -> dict:
    """``data/sites/site<i>/`` (unlabeled sites), ``pooled/``, ``pool/`` (labeled site, labels unused),
    ``labeled/`` and ``test/`` (class folders). Written once; ``data.json`` says what they hold."""
    info_path = data / "data.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    shutil.rmtree(data, ignore_errors=True)
    if args.data == "phantom":
        from histodiff.data.phantom_tissue import write_phantom_site

        for s in range(3):  # stains 0, 1, 2; `pooled/` holds the same files (hard links)
            site = write_phantom_site(data / "sites" / f"site{s}", args.unlabeled_per_class, 64, site=s, seed=0,
                                      labeled=False)
            for f in sorted(site.glob("*.png")):
                _link(f, data / "pooled" / f.name)
        # the labeled site: stain 3, unseen by the federation; its labeled tiles are the first of its pool
        write_phantom_site(data / "pool", args.pool_per_class, 64, site=3, seed=1, labeled=False)
        write_phantom_site(data / "labeled", args.labeled_per_class, 64, site=3, seed=1)
        write_phantom_site(data / "test", args.test_per_class, 64, site=3, seed=2)
        how = (f"phantom tiles at 64 px: 3 unlabeled sites x {args.unlabeled_per_class}/class (stains 0-2); labeled "
               f"site (stain 3): pool {args.pool_per_class}/class, labeled {args.labeled_per_class}/class "
               f"({100 * args.labeled_per_class / args.pool_per_class:.0f}% of the pool), test {args.test_per_class}/class (new seed)")
    elif args.data == "real":
        shared = Path(args.shared)
        unl, crc = shared / "he-unlabeled", shared / "crc-val-he-32"
        if not unl.is_dir() or not crc.is_dir():
            raise SystemExit(f"error: --data real needs {unl} and {crc} (the shared sample data)")
        for i, site in enumerate(sorted(d for d in unl.iterdir() if d.is_dir())):
            for f in sorted(site.iterdir()):
                if f.suffix.lower() in IMAGE_EXT:
                    _link(f, data / "sites" / f"site{i}" / f.name)
                    _link(f, data / "pooled" / f"{site.name}_{f.name}")
        labeled, test = _split(_class_files(crc), 0.5, args.split_seed)
        _link_classes(labeled, data / "labeled")
        _link_classes(labeled, data / "pool", flat=True)
        _link_classes(test, data / "test")
        how = ("real H&E (smoke test, not evidence): the 3 he-unlabeled folders as sites; crc-val-he-32 split in half "
               "per class (fixed seed): 2 labeled tiles/class (also the labeled site's whole pool), 2 test tiles/class")
    else:
        for i, site in enumerate(args.sites):
            site = Path(site)
            for f in sorted(site.rglob("*")):
                if f.suffix.lower() in IMAGE_EXT:
                    rel = f.relative_to(site).as_posix().replace("/", "_")
                    _link(f, data / "sites" / f"site{i}" / rel)
                    _link(f, data / "pooled" / f"site{i}_{rel}")
        pool = _class_files(Path(args.labeled_pool))
        labeled, _ = _split(pool, args.labeled_fraction, args.split_seed)
        _link_classes(labeled, data / "labeled")
        _link_classes(pool, data / "pool", flat=True)
        _link_classes(_class_files(Path(args.test)), data / "test")
        how = (f"folders: sites {', '.join(args.sites)}; labeled pool {args.labeled_pool}, labeled split "
               f"{args.labeled_fraction:g} per class (seed {args.split_seed}); test {args.test}")

    def count(d: Path) -> int:
        return sum(1 for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXT)

    info = {"how": how, "tiles": {"sites": [count(d) for d in sorted((data / "sites").iterdir())],
            "pooled": count(data / "pooled"), "pool": count(data / "pool"), "labeled": count(data / "labeled"),
            "test": count(data / "test")}}
    info_path.write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------------------- steps

def run_step(args, name: str, cmd: list[str], out: Path) -> None:
    """Run one step as its own process, its output appended to ``OUT/logs/<name>.log``; its seconds are added to
    ``OUT/timings.json``."""
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    say(f"{name}: {' '.join(cmd[2:])}  (log {log_dir / (name + '.log')})")
    start = time.perf_counter()
    with open(log_dir / f"{name}.log", "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    add_time(out, name, seconds)
    if rc != 0:
        tail = (log_dir / f"{name}.log").read_text().strip().splitlines()[-5:]
        raise SystemExit(f"error: step {name} failed (exit {rc}); last lines of its log:\n  " + "\n  ".join(tail))
    say(f"{name}: done in {seconds / 60:.1f} min")


_TIMINGS_LOCK = threading.Lock()


def read_times(out: Path) -> dict[str, float]:
    path = out / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def add_time(out: Path, name: str, seconds: float) -> None:
    """Add a step's seconds to ``OUT/timings.json``, the one record of step times. Read and rewritten under a lock:
    settings may run at once (``--jobs``, or separate commands on the same ``--out``)."""
    with _TIMINGS_LOCK:
        timings = read_times(out)
        timings[name] = round(timings.get(name, 0.0) + seconds, 1)
        tmp = out / f"timings.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(timings, indent=1))
        tmp.replace(out / "timings.json")


def lae_steps(args) -> int:
    from histodiff.config import compose

    return args.lae_steps or int(compose(args.overrides).train.steps)


def pretrain(args, setting: str, data: Path, out: Path) -> Path:
    """Pre-train the setting's LAE and DM; returns its exported model folder."""
    py = sys.executable
    run_dir = out / "pretrain" / setting
    if setting in ("labeled", "pooled"):
        tiles = data / ("pool" if setting == "labeled" else "pooled")
        model = run_dir / "global"
        if not (model / "model_info.json").is_file():
            common = [f"data={tiles}", f"run_dir={run_dir}", "train.progress=false",
                      f"train.watch_every={args.watch_every}", *args.overrides]
            run_step(args, f"{setting}-lae", [py, "-m", "histodiff.train", "stage=lae",
                     f"train.steps={lae_steps(args)}", *common], out)
            run_step(args, f"{setting}-dm", [py, "-m", "histodiff.train", "stage=dm", f"train.steps={args.dm_steps}",
                     *common], out)
        return model
    # federated: the same tiles processed in all (steps x batch), a third at each site per round
    sites = sorted((data / "sites").iterdir())
    n = len(sites)
    lae_local = math.ceil(lae_steps(args) / (n * args.lae_rounds))
    dm_local = math.ceil(args.dm_steps / (n * args.dm_rounds))
    overrides = " ".join(o for o in args.overrides if not o.startswith("profile="))
    profile = next(o.split("=", 1)[1] for o in args.overrides if o.startswith("profile="))
    config = (f'profile="{profile}" overrides="{overrides} train.progress=false" seed=0 '
              f"lae-rounds={args.lae_rounds} dm-rounds={args.dm_rounds} lae-local-steps={lae_local} "
              f"dm-local-steps={dm_local} min-sites={n} sites-root=\"{data / 'sites'}\" labeled-partitions=\"\" "
              'deliver=false augment=false memorisation-samples=0 round-timeout=7200.0 wait-timeout=1800.0')
    found = sorted(run_dir.rglob("global_model/model_info.json"))
    if not found:
        from strategies.schedule import load_state

        where = ["--resume", str(run_dir)] if load_state(run_dir) is not None else ["--run-dir", str(run_dir)]
        run_step(args, "federated-pretrain", [py, "-m", "server.run", *where, "--simulation", str(n), "--config",
                 config, "--timeout", str(12 * 3600)], out)
        found = sorted(run_dir.rglob("global_model/model_info.json"))
        if not found:
            raise SystemExit(f"error: the federated run in {run_dir} ended without a global_model (see its logs)")
    return found[-1].parent


def labeled_pipeline(args, setting: str, data: Path, model: Path, out: Path) -> Path:
    where = out / "augment" / setting
    if not (where / "results.json").is_file() or not (where / "table1.md").is_file():
        seeds = ",".join(str(s) for s in args.seeds)
        run_step(args, f"{setting}-pipeline", [sys.executable, "-m", "client.augment", "--data", str(data / "labeled"),
                 "--test", str(data / "test"), "--model", str(model), "--out", str(where),
                 *args.overrides, f"augment.seeds=[{seeds}]", "train.progress=false"], out)
    return where


# ------------------------------------------------------------------------------------------------- measures

def measure(args, setting: str, data: Path, model: Path, augment: Path, out: Path) -> dict:
    """Reconstruction, class fidelity and FID/KID against the held-out test tiles (cached in measures/)."""
    path = out / "measures" / f"{setting}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    import csv

    import torch
    from diffusers import AutoencoderKL

    from histodiff.config import compose
    from histodiff.evaluation.downstream import fit_input, loader
    from histodiff.evaluation.fid import fid_report, inception_features
    from histodiff.evaluation.trained_classifiers import load_classifier
    from histodiff.model_files import load_global_model
    from histodiff.autoencoder.lpips_vgg import build_lpips
    from histodiff.evaluation.inception import load_inception
    from histodiff.evaluation.reconstruction import reconstruction_metrics
    from histodiff.data.tile_dataset import TileFolder, TileOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(args.overrides)
    size = cfg.tiles.image_size
    autoencoder, _, info = load_global_model(model, cfg)
    autoencoder = autoencoder.eval().requires_grad_(False)
    phi, phi_meta = load_classifier(augment / "aux_classifier")
    test = TileFolder.open(str(data / "test"), TileOptions(size), work_dir=str(out / "measures" / "index-test"))
    lpips_net = build_lpips(cfg.weights).eval()
    result: dict = {"setting": setting, "model": str(model)}
    with torch.no_grad():
        result["reconstruction"] = reconstruction_metrics(autoencoder, phi, phi_meta["img_size"], test, lpips_net, 32)
        finetuned = augment / "decoder"  # the pipeline's fine-tuned autoencoder (diffusers folder)
        if (finetuned / "config.json").is_file():
            tuned = AutoencoderKL.from_pretrained(str(finetuned)).eval().requires_grad_(False)
            result["reconstruction_finetuned"] = reconstruction_metrics(tuned, phi, phi_meta["img_size"], test,
                                                                         lpips_net, 32)
    # candidates and the sets chosen from them (manifest rows follow the candidates' order)
    with open(augment / "synthetic" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = phi_meta["classes"]
    scores = torch.load(augment / "selection" / "scores.pt", weights_only=True)
    target = scores["target"]
    pred = []
    with torch.no_grad():  # phi on every candidate, in manifest (= scores) order
        for i in range(0, len(rows), 64):
            x = torch.stack([_read_tile(augment / "synthetic" / r["path"], size) for r in rows[i:i + 64]])
            pred.append(phi(fit_input(x, phi_meta["img_size"])).argmax(1))
    pred = torch.cat(pred) if pred else torch.empty(0, dtype=torch.long)
    sets = {"all candidates": list(range(len(rows)))}
    for i, r in enumerate(rows):
        for name in filter(None, r["selected_in"].split(";")):
            sets.setdefault(name, []).append(i)
    result["fidelity"] = {name: {"tiles": len(idx), "phi_agrees": float((pred[idx] == target[idx]).float().mean())
                                 if idx else None,
                                 "per_class": {c: _share(pred, target, idx, k) for k, c in enumerate(classes)}}
                          for name, idx in sets.items()}
    # FID / KID against the test tiles, per class and overall
    inception = load_inception(cfg.weights).eval()
    batches = list(loader(test, 64, False))  # one pass over the test tiles for features and labels
    real_inc = inception_features(inception, [x for x, _ in batches])
    real_y = torch.cat([torch.as_tensor(y) for _, y in batches])
    fake_inc = scores["fake_inception"]
    result["fid_test"] = {name: fid_report(real_inc, real_y, fake_inc[idx], target[idx], classes)
                          for name, idx in sets.items() if len(idx) >= 2}
    result["phi_val_accuracy"] = phi_meta["best_val_accuracy"]
    result["scale_factor"] = info.get("scale_factor")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    picture(cfg, autoencoder, test, augment, rows, sets, classes, out / "pictures" / f"{setting}.png")
    add_time(out, f"{setting}-measures", time.perf_counter() - started)
    return result


def _share(pred, target, idx: list[int], k: int) -> float | None:
    sub = [i for i in idx if int(target[i]) == k]
    return float((pred[sub] == k).float().mean()) if sub else None


def _read_tile(path: Path, size: int):
    """A tile as the pipeline reads it: size x size, channels first, in [-1, 1]."""
    from histodiff.data.images import from_uint8_image, load_square
    from histodiff.data.tile_dataset import TileOptions

    return from_uint8_image(load_square(path, size, TileOptions.max_image_pixels))


def picture(cfg, autoencoder, test, augment: Path, rows: list[dict], sets: dict, classes: list[str], path: Path) -> None:
    """One row per class: 4 real test tiles | their reconstructions | 4 selected synthetic tiles (widest set)."""
    import torch
    from PIL import Image, ImageDraw

    k, size = 4, cfg.tiles.image_size
    labels = [int(test[i][1]) for i in range(len(test))]
    widest = max((n for n in sets if n.startswith("selective")), key=lambda n: len(sets[n]), default="all candidates")
    pad, left, top = 4, 60, 18
    width = left + 3 * (k * size + pad) + pad
    canvas = Image.new("RGB", (width, top + len(classes) * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, head in enumerate(("real (test)", "reconstructed", f"synthetic ({widest})")):
        draw.text((left + j * (k * size + pad), 3), head, fill="black")

    def paste(t, x, y):
        arr = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(arr).resize((size, size)), (x, y))

    for c, name in enumerate(classes):
        y0 = top + c * (size + pad)
        draw.text((3, y0 + size // 2 - 5), name, fill="black")
        idx = [i for i, y in enumerate(labels) if y == c][:k]
        if idx:
            x = torch.stack([test[i][0] for i in idx])
            with torch.no_grad():
                x_hat = autoencoder.decode(autoencoder.encode(x).latent_dist.mode()).sample
            for j in range(len(idx)):
                paste(x[j], left + j * size, y0)
                paste(x_hat[j], left + k * size + pad + j * size, y0)
        chosen = [r for i, r in enumerate(rows) if i in set(sets.get(widest, [])) and r["class"] == name][:k]
        for j, r in enumerate(chosen):
            paste(_read_tile(augment / "synthetic" / r["path"], size), left + 2 * (k * size + pad) + j * size, y0)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ------------------------------------------------------------------------------------------------- report

def _ms(values: list[float]) -> str:
    import statistics

    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def report(args, info: dict, results: dict, timings: dict, out: Path) -> str:
    """The markdown: setup, per setting the downstream table (mean ± std over seeds) and the stage figures."""
    lines = [f"# Evidence run: {info['how']}", "",
             f"Command: `python -m benchmarks.evidence {' '.join(sys.argv[1:])}`", "",
             f"Tiles: {json.dumps(info['tiles'])}. Downstream seeds: {args.seeds}. "
             f"Pre-training per setting: {lae_steps(args)} LAE steps and {args.dm_steps} DM steps' worth of tiles "
             f"(federated: {args.lae_rounds} + {args.dm_rounds} rounds, the steps split over the sites).", "",
             "Time per step (minutes): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()) +
             f"; sum {sum(timings.values()) / 60:.1f} (with --jobs, steps of different settings overlap in time).",
             ""]
    lines += ["## Downstream accuracy on the held-out test tiles (%, mean ± sample std over seeds)", "",
              "| row | " + " | ".join(SETTINGS[s] for s in results) + " |", "|---|" + "---|" * len(results)]
    rows = []
    for s, r in results.items():
        for name, entry in r["pipeline"]["settings"].items():
            if name not in rows:
                rows.append(name)
    for name in rows:
        cells = []
        for s, r in results.items():
            entry = r["pipeline"]["settings"].get(name)
            accs = [m["accuracy"] for m in entry["seeds"].values()] if entry else []
            cells.append(_ms(accs) + ("" if not entry or entry.get("quota_met", True) else " (quota short)"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Stages", "", "| figure | " + " | ".join(SETTINGS[s] for s in results) + " |",
              "|---|" + "---|" * len(results)]

    def row(label, get):
        vals = []
        for r in results.values():
            try:
                vals.append(get(r))
            except (KeyError, TypeError, IndexError):
                vals.append("-")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")

    row("phi accuracy, real test tiles (%)", lambda r: _f(100 * r["measures"]["reconstruction"]["real_accuracy"]))
    row("phi accuracy, reconstructed (%), before decoder fine-tuning",
        lambda r: _f(100 * r["measures"]["reconstruction"]["reconstruction_accuracy"]))
    row("phi accuracy, reconstructed (%), after fine-tuning",
        lambda r: _f(100 * r["measures"]["reconstruction_finetuned"]["reconstruction_accuracy"]))
    row("PSNR (dB) / LPIPS", lambda r: f"{r['measures']['reconstruction']['psnr']:.1f} / "
        f"{r['measures']['reconstruction']['lpips']:.3f}")
    for t in ("0", "500", "999"):
        row(f"latent classifier val accuracy, t = {t} (%)",
            lambda r, t=t: _f(100 * r["pipeline"]["latent_classifier"]["val_accuracy_by_t"][t]))
    row("class fidelity: phi agrees with the target, all candidates (%)",
        lambda r: _f(100 * r["measures"]["fidelity"]["all candidates"]["phi_agrees"]))
    sel = [n for n in rows if n.startswith("selective")]
    for name in sel:
        row(f"class fidelity, {name} (%)", lambda r, n=name: _f(100 * r["measures"]["fidelity"][n]["phi_agrees"]))
    row("FID vs test tiles, all candidates (overall)", lambda r: _f(r["measures"]["fid_test"]["all candidates"]["fid"]))
    row("KID vs test tiles, all candidates (x1000)",
        lambda r: _f(1000 * r["measures"]["fid_test"]["all candidates"]["kid"], "{:.1f}"))
    if sel:
        row(f"FID vs test tiles, {sel[-1]}", lambda r: _f(r["measures"]["fid_test"][sel[-1]]["fid"]))
    row("quotas met at 200%", lambda r: str(r["pipeline"]["settings"].get("selective_200", {}).get("quota_met", "-")))
    classes = next(iter(results.values()))["measures"]["fid_test"]["all candidates"]["per_class"].keys()
    lines += ["", "### FID per class vs the test tiles (all candidates)", "",
              "| class | " + " | ".join(SETTINGS[s] for s in results) + " |", "|---|" + "---|" * len(results)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(_f(r["measures"]["fid_test"]["all candidates"]["per_class"][c]["fid"])
                                            for r in results.values()) + " |")
    lines += per_class_table(results)
    lines += ["", "### Pictures (rows: classes; real test tiles | their reconstructions | selected synthetic)", ""]
    for s in results:
        lines.append(f"**{SETTINGS[s]}**\n\n![{s}](pictures/{s}.png)\n")
    return "\n".join(lines) + "\n"


def per_class_table(results: dict) -> list[str]:
    """Per setting and class: the synthetic tiles the selective 200% row added (or the widest selective row) and the
    downstream sensitivity (recall, mean over seeds) of real only, + random 50% and that row: which classes the
    synthetic tiles help or hurt."""
    import statistics

    lines = []
    for s, r in results.items():
        rows = r["pipeline"]["settings"]
        sel = "selective_200" if "selective_200" in rows else max((n for n in rows if n.startswith("selective")),
                                                                  key=lambda n: rows[n].get("n_synthetic", 0),
                                                                  default=None)
        shown = [n for n in ("baseline", "random_50", sel) if n in rows]
        if sel is None or not all("per_class" in m for n in shown for m in rows[n]["seeds"].values()):
            continue
        added = {c: v.get("n_fake") for c, v in rows[sel].get("fid_report", {}).get("per_class", {}).items()}
        recall: dict[str, dict[str, float]] = {}
        for n in shown:
            by_class: dict[str, list[float]] = {}
            for m in rows[n]["seeds"].values():
                for c in m["per_class"]:
                    by_class.setdefault(c["class"], []).append(c["sensitivity"])
            recall[n] = {c: statistics.fmean(v) for c, v in by_class.items()}
        lines += ["", f"### Per class, {SETTINGS[s]}: synthetic tiles added by {sel}, and sensitivity (%, mean over "
                  "seeds)", "", f"| class | tiles added ({sel}) | " + " | ".join(shown) + f" | {sel} - baseline |",
                  "|---|---|" + "---|" * (len(shown) + 1)]
        for c in recall["baseline"]:
            cells = [_f(100 * recall[n].get(c)) if c in recall[n] else "-" for n in shown]
            gain = _f(100 * (recall[sel][c] - recall["baseline"][c]), "{:+.1f}") if c in recall[sel] else "-"
            lines.append(f"| {c} | {_f(added.get(c), '{}')} | " + " | ".join(cells) + f" | {gain} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = out / "data"
    info = prepare_data(args, data)
    say(f"data: {info['how']}; tiles {info['tiles']}")

    def run_setting(setting: str) -> dict:
        model = pretrain(args, setting, data, out)
        augment = labeled_pipeline(args, setting, data, model, out)
        measures = measure(args, setting, data, model, augment, out)
        say(f"{setting}: done")
        return {"pipeline": json.loads((augment / "results.json").read_text()), "measures": measures}

    if args.jobs > 1 and len(args.settings) > 1:
        # each setting's steps are their own processes: threads here only wait on them; a failed setting lets the
        # others finish (their results are kept), then its error ends the command
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(args.jobs, len(args.settings))) as pool:
            futures = {s: pool.submit(run_setting, s) for s in args.settings}
        results = {s: f.result() for s, f in futures.items()}
    else:
        results = {s: run_setting(s) for s in args.settings}
    timings = read_times(out)  # with the steps another command on the same --out ran meanwhile
    md = report(args, info, results, timings, out)
    (out / "evidence.json").write_text(json.dumps({"args": vars(args), "data": info, "timings": timings,
                                                    "results": results}, indent=1, default=str))
    (out / "evidence.md").write_text(md)
    if args.report:
        dest = Path(args.report)
        pics = dest.parent / f"{dest.stem}-pictures"
        pics.mkdir(parents=True, exist_ok=True)
        for s in results:
            shutil.copy2(out / "pictures" / f"{s}.png", pics / f"{s}.png")
        dest.write_text(md.replace("](pictures/", f"]({pics.name}/"))
    say(f"finished in {(time.perf_counter() - started) / 60:.1f} min this time: {out / 'evidence.md'}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
