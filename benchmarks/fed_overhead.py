"""Round wall time in Flower's simulation runtime against the same local steps without Flower.

``python -m benchmarks.fed_overhead [--steps 20] [--threads 1]``: 1 site, 2 LAE rounds of ``steps`` local steps through
``flwr run`` (simulation runtime); baseline: ``train_lae_steps`` twice with the same steps, in one process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import TINY_OVERRIDES as OVERRIDES, simulate



def baseline(steps: int, data: Path, work: Path, threads: int | None = None) -> list[float]:
    import torch

    from histodiff.config import compose
    from histodiff.data.tile_dataset import tile_dataset_from_config
    from histodiff.local_training.local_steps import train_lae_steps
    from wire.contract import init_phase

    if threads:
        torch.set_num_threads(threads)
    cfg = compose(["profile=tiny", *OVERRIDES.split(), f"data={data}", f"work_dir={work}"])
    ds = tile_dataset_from_config(cfg)
    weights, times = init_phase(cfg, "lae", 0), []
    for _ in range(2):
        t = time.time()
        weights = train_lae_steps(cfg, ds, work / "lae", steps, init_weights=weights, progress=False).weights
        times.append(time.time() - t)
    return times


def federated(steps: int, root: Path, run_dir: Path) -> list[float]:
    config = (f'overrides="{OVERRIDES}" lae-rounds=2 dm-rounds=0 deliver=false labeled-partitions="" '
              f'local-steps={steps} min-sites=1 sites-root="{root}"')
    return [m["seconds"] for m in simulate(run_dir, 1, config, 1200) if m["phase"] == "lae"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the baseline (1: what each simulated site gets; default: torch's)")
    a = p.parse_args(argv)
    from histodiff.data.phantom_tissue import write_phantom_site

    d = Path(tempfile.mkdtemp(prefix="fedover"))
    write_phantom_site(d / "root" / "site0", per_class=4, size=64, site=0, seed=0, labeled=False)
    base = baseline(a.steps, d / "root" / "site0", d / "central", a.threads)
    fed = federated(a.steps, d / "root", d / "run")
    import torch

    print(f"{a.steps} LAE steps per round, tiny profile, 1 site (36 tiles, 64 px), CPU; baseline on "
          f"{torch.get_num_threads()} torch thread(s)")
    for i, (b, f) in enumerate(zip(base, fed), 1):
        print(f"round {i}: without Flower {b:.1f} s, Flower simulation round {f:.1f} s, overhead ratio {f / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
