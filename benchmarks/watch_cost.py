"""Cost of one watch call (``train.watch_every``; histodiff/evaluation/watch.py), without training:
``python -m benchmarks.watch_cost --profile tiny --phase dm --tiles 32``.

Builds an untrained LAE or DM module at the profile's sizes, writes 64 px phantom tiles, and calls the watch twice
(the first call also computes the fixed real tiles' Inception features, later calls reuse them); prints wall and
CPU seconds of each call as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path


class _Trainer:  # the two things WatchCallback.watch reads from a Lightning trainer
    is_global_zero = True
    loggers: list = []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.watch_cost", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="tiny")
    p.add_argument("--phase", choices=("lae", "dm"), default="dm")
    p.add_argument("--tiles", type=int, default=32, help="train.watch_tiles")
    p.add_argument("--out", default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from histodiff.config import compose
    from histodiff.data import TileFolder, TileOptions
    from histodiff.data.phantom_tissue import write_phantom_site
    from histodiff.evaluation.watch import watch_callback

    out = Path(args.out or tempfile.mkdtemp(prefix="watch-cost-"))
    tiles = write_phantom_site(out / "tiles", max(8, args.tiles // 9 + 8), 64, site=0, seed=0, labeled=False)
    cfg = compose([f"profile={args.profile}", "train.watch_every=1", f"train.watch_tiles={args.tiles}",
                   f"data={tiles}", f"run_dir={out}", *args.overrides])
    dataset = TileFolder.open(str(tiles), TileOptions(64, augment=True), work_dir=str(out / "index"))
    _, callback = watch_callback(cfg, args.phase, dataset, out / "watch")
    if args.phase == "lae":
        from histodiff.autoencoder.lae_module import LAEModule

        module = LAEModule(cfg)
    else:
        from histodiff.autoencoder.kl_autoencoder import build_autoencoder
        from histodiff.diffusion.dm_module import DMModule

        module = DMModule(cfg, build_autoencoder(cfg.lae).eval(), 1.0)
    for step in (1, 2):
        callback.watch(_Trainer(), module, step)
    first, cached = callback.history[0], callback.history[1]
    print(json.dumps({"profile": args.profile, "phase": args.phase, "tiles": args.tiles,
                      "ddim_steps": cfg.train.watch_ddim_steps,
                      "first_wall_cpu_s": [round(first["seconds"], 1), round(first["cpu_seconds"], 1)],
                      "cached_wall_cpu_s": [round(cached["seconds"], 1), round(cached["cpu_seconds"], 1)],
                      "load_average": round(os.getloadavg()[0], 1)}), flush=True)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
