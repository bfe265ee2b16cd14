"""The federated story on phantom data: ``python -m server.demo --out runs/demo-fed``.

3 unlabeled sites with different stains pre-train the LAE and the DM in Flower's simulation runtime
(latent statistics round in between); then the global model goes to 1 labeled site unseen in pre-training,
which runs the labeled-site pipeline (``--no-augment``: stores the model only). Progress: one line per round.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__)
    p.add_argument("--out", default="runs/demo-fed", help="run directory")
    p.add_argument("--unlabeled", type=int, default=3, help="unlabeled (pre-training) sites")
    p.add_argument("--per-class", type=int, default=20, help="phantom tiles per class and site")
    p.add_argument("--lae-rounds", type=int, default=4)
    p.add_argument("--dm-rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=50)
    p.add_argument("--overrides", default="", help="extra config overrides, e.g. 'weights.perceptual=random'")
    p.add_argument("--timeout", type=float, default=3 * 3600.0)
    p.add_argument("--no-augment", action="store_true", help="deliver the model without running the labeled-site pipeline")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from server.run import main as run

    n = args.unlabeled + 1  # partition ids 0..n-2 unlabeled, n-1 labeled (its own stain, unseen in pre-training)
    config = (f'overrides="{args.overrides}" lae-rounds={args.lae_rounds} dm-rounds={args.dm_rounds} '
              f'local-steps={args.local_steps} min-sites={min(2, args.unlabeled)} phantom-per-class={args.per_class} '
              f'labeled-partitions="{n - 1}" round-timeout=3600.0 wait-timeout=300.0 '
              f'augment={"false" if args.no_augment else "true"}')
    from pathlib import Path

    from strategies.schedule import load_state

    # rerunning after an interruption continues the run (its run config is kept in the run directory)
    where = ["--resume", args.out] if load_state(Path(args.out)) is not None else ["--run-dir", args.out]
    return run([*where, "--simulation", str(n), "--config", config, "--timeout", str(args.timeout)])


if __name__ == "__main__":
    sys.exit(main())
