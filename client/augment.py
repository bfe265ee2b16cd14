"""``python -m client.augment --data DIR --test DIR --model MODEL_DIR [--out DIR] [key=value ...]``:
the labeled-site pipeline (decoder fine-tuning, guided generation, selection, Table 1) on a delivered model.

MODEL_DIR is RUN_DIR/global_model of a federated run (at a labeled site: <work>/<run>/global_model) or
RUN_DIR/global of a single-site ``histodiff.train`` run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histodiff.config import compose, main_guard
from histodiff.logs import setup_logging


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client.augment", description=__doc__)
    parser.add_argument("--data", required=True, help="labeled tiles, one sub-folder per class")
    parser.add_argument("--test", required=True, help="test tiles, the same class sub-folders")
    parser.add_argument("--model", required=True,
                        help="exported model folder: RUN_DIR/global_model (federated) or RUN_DIR/global (single site)")
    parser.add_argument("--out", default="runs/augment", help="output folder (rerun to resume)")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="go on (with a warning) when test tiles are also training tiles; refused otherwise")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. profile=tiny augment.ratios=[0.5,1]")
    return parser.parse_args(argv)


@main_guard
def main(argv: list[str]) -> int:
    from histodiff.labeled_site.pipeline import run_augment

    args = parse(argv)
    cfg = compose([*args.overrides, *(["augment.allow_overlap=true"] if args.allow_overlap else [])])
    out = Path(args.out)
    setup_logging(out, "augment.log")
    run_augment(cfg, args.data, args.test, args.model, out)
    print((out / "table1.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
