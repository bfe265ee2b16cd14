"""Command line: write phantom H&E tiles for one site or several (``python -m histodiff.phantom --out DIR``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histodiff.config import main_guard
from histodiff.data.phantom_tissue import CLASSES, write_phantom_site
from histodiff.errors import InputError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage plus the message; entry points here answer with one line
        raise InputError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m histodiff.phantom", description=__doc__)
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--per-class", type=int, default=40, help="tiles per class (default 40)")
    ap.add_argument("--size", type=int, default=64, help="tile side in pixels (default 64)")
    ap.add_argument("--site", type=int, default=None, help="stain style of this site id (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unlabeled", action="store_true", help="one flat folder instead of class sub-folders")
    ap.add_argument("--sites", type=int, default=None, help="write OUT/site0 .. OUT/site{N-1}, one style each")
    return ap


@main_guard
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.per_class < 1:
        raise InputError(f"--per-class must be at least 1, got {args.per_class}")
    if not 8 <= args.size <= 4096:
        raise InputError(f"--size must be between 8 and 4096, got {args.size}")
    if args.site is not None and args.site < 0:
        raise InputError(f"--site must be >= 0, got {args.site}")
    if args.sites is not None and args.sites < 1:
        raise InputError(f"--sites must be at least 1, got {args.sites}")
    if args.sites is not None and args.site is not None:
        raise InputError("give either --site or --sites, not both")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a folder")

    targets = ([(args.out / f"site{k}", k) for k in range(args.sites)] if args.sites is not None
               else [(args.out, args.site or 0)])
    kind = "unlabeled" if args.unlabeled else "labeled"
    for folder, site in targets:
        try:
            write_phantom_site(folder, args.per_class, args.size, site, args.seed, labeled=not args.unlabeled)
        except OSError as exc:
            raise InputError(f"cannot write tiles to {folder}: {exc.strerror or exc}") from None
        print(f"wrote {args.per_class * len(CLASSES)} {kind} {args.size}px tiles "
              f"({args.per_class} per class, site {site}, seed {args.seed}) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
