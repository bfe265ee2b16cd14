"""The main job on an embedded default: phantom tiles -> LAE -> latent statistics -> DM -> sample grid.

``python -m histodiff.demo --out runs/demo [overrides...]`` (what ``make demo`` runs). Rerunning
resumes: finished stages are skipped, an interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from histodiff.config import main_guard


@main_guard
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m histodiff.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--per-class", type=int, default=40, help="phantom tiles per class")
    parser.add_argument("--lae-steps", type=int, default=200)
    parser.add_argument("--dm-steps", type=int, default=600)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)

    from histodiff import train
    from histodiff.data.phantom_tissue import write_phantom_site

    out = Path(args.out)
    tiles = out / "phantom-site0"
    if not tiles.exists():
        write_phantom_site(tiles, per_class=args.per_class, size=64, site=0, seed=0, labeled=False)
        print(f"phantom tiles -> {tiles}")
    common = [f"data={tiles}", f"run_dir={out}", *args.overrides]
    start = time.time()
    for stage, steps in (("lae", args.lae_steps), ("dm", args.dm_steps), ("sample", 1)):
        code = train.main([f"stage={stage}", f"train.steps={steps}", *common])
        if code:
            return code
    print(f"done in {time.time() - start:.0f} s: samples {out / 'samples' / 'grid.png'}, "
          f"reconstructions {out / 'lae' / 'reconstructions.png'}, logs {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
