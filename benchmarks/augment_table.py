"""Table 1 on phantom data at the tiny profile, measured: pre-train LAE + DM on unlabeled phantom sites, then run
the labeled-site pipeline on another site's labeled tiles and a held-out test set.

``python -m benchmarks.augment_table --out runs/bench-augment [--labeled-per-class 10] [--test-per-class 10]
[--unlabeled-per-class 20] [--lae-steps 150] [--dm-steps 300] [key=value ...]`` prints the table, the sizes,
the seeds and the time of each part; rerunning resumes (pre-training and every pipeline stage).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from histodiff.data.phantom_tissue import CLASSES, write_phantom_site


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-augment")
    p.add_argument("--labeled-per-class", type=int, default=10)
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--unlabeled-per-class", type=int, default=20)
    p.add_argument("--lae-steps", type=int, default=150)
    p.add_argument("--dm-steps", type=int, default=300)
    p.add_argument("overrides", nargs="*", help="config overrides for pre-training and the pipeline")
    args = p.parse_args()

    from histodiff.config import compose
    from histodiff.labeled_site.pipeline import run_augment
    from histodiff.cli.train_site import main as train_main

    out = Path(args.out)
    unlabeled, labeled, test = out / "data" / "unlabeled", out / "data" / "labeled", out / "data" / "test"
    sizes = f"{args.unlabeled_per_class} {args.labeled_per_class} {args.test_per_class}"  # tiles per class
    done = out / "data" / ".done"
    if not done.exists() or done.read_text() != sizes:  # other sizes: new data (a rerun reuses the same)
        shutil.rmtree(out / "data", ignore_errors=True)
        # two unlabeled sites pooled for pre-training; the labeled site (0) has its own stain and was never seen
        for site in (1, 2):
            write_phantom_site(unlabeled, args.unlabeled_per_class, 64, site=site, seed=0, labeled=False)
        write_phantom_site(labeled, args.labeled_per_class, 64, site=0, seed=0)
        write_phantom_site(test, args.test_per_class, 64, site=0, seed=1)
        done.write_text(sizes)
    common = ["profile=tiny", f"run_dir={out / 'pretrain'}", f"data={unlabeled}", "train.progress=false",
              "train.log_every=50", *args.overrides]
    timings = {}
    for stage, steps in (("lae", args.lae_steps), ("dm", args.dm_steps)):
        start = time.perf_counter()
        if train_main([f"stage={stage}", f"train.steps={steps}", *common]) != 0:
            raise SystemExit(f"pre-training stage {stage} failed")
        timings[f"pretrain_{stage}_s"] = round(time.perf_counter() - start, 1)

    cfg = compose(["profile=tiny", "train.progress=false", *args.overrides])
    start = time.perf_counter()
    results = run_augment(cfg, labeled, test, out / "pretrain" / "global", out / "augment")
    timings["pipeline_s"] = round(time.perf_counter() - start, 1)
    summary = {"command": "python -m benchmarks.augment_table " + " ".join(sys.argv[1:]),
        "sizes": {"unlabeled_pretrain": 2 * len(CLASSES) * args.unlabeled_per_class, **results["tiles"],
                  "candidates": results["selection"]["candidates"]},
        "seeds": {"pipeline": cfg.seed, "downstream": list(cfg.augment.seeds)}, "timings": timings,
        "latent_classifier_val_accuracy_by_t": results["latent_classifier"]["val_accuracy_by_t"],
        "decoder": {k: results["decoder"][k] for k in ("val_before", "val_after")},
        "quotas": {k: {"met": v.get("quota_met", True), "shortfall": v.get("shortfall", {}),
                       "memorised_dropped": v.get("memorised_dropped", 0)} for k, v in results["settings"].items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print((out / "augment" / "table1.md").read_text())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
