"""Round wall time in Flower's simulation runtime against the same local steps without Flower.

``python -m benchmarks.fed_overhead [--steps 20]``: 1 site, 2 LAE rounds of ``steps`` local steps through
``flwr run`` (simulation runtime); baseline: ``train_lae_steps`` twice with the same steps, in one process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = "weights.perceptual=random tiles.batch_size=4"


def baseline(steps: int, data: Path, work: Path) -> list[float]:
    from histodiff.config import compose
    from histodiff.data.tiles import tile_dataset_from_config
    from histodiff.training.local import train_lae_steps
    from strategies.checkpoint import init_lae_weights

    cfg = compose(["profile=tiny", *OVERRIDES.split(), f"data={data}", f"work_dir={work}"])
    ds = tile_dataset_from_config(cfg)
    weights, times = init_lae_weights(cfg, 0), []
    for _ in range(2):
        t = time.time()
        weights = train_lae_steps(cfg, ds, work / "lae", steps, init_weights=weights, progress=False).weights
        times.append(time.time() - t)
    return times


def federated(steps: int, root: Path, run_dir: Path) -> list[float]:
    from strategies.checkpoint import read_metrics

    config = (f'overrides="{OVERRIDES}" lae-rounds=2 dm-rounds=0 deliver=false local-steps={steps} min-sites=1 '
              f'sites-root="{root}"')
    subprocess.run([sys.executable, "-m", "server.run", "--run-dir", str(run_dir), "--simulation", "1", "--config",
                    config, "--timeout", "1200"], check=True, capture_output=True, text=True)
    return [m["seconds"] for m in read_metrics(run_dir) if m["phase"] == "lae"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    from histodiff.data.phantom import write_phantom_site

    d = Path(tempfile.mkdtemp(prefix="fedover"))
    write_phantom_site(d / "root" / "site0", per_class=4, size=64, site=0, seed=0, labeled=False)
    base = baseline(a.steps, d / "root" / "site0", d / "central")
    fed = federated(a.steps, d / "root", d / "run")
    print(f"{a.steps} LAE steps per round, tiny profile, 1 site (36 tiles, 64 px), CPU")
    for i, (b, f) in enumerate(zip(base, fed), 1):
        print(f"round {i}: without Flower {b:.1f} s, Flower simulation round {f:.1f} s, overhead ratio {f / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
