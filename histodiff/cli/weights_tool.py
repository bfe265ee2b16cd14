"""``python -m histodiff.weights fetch|check``: fill the offline weights cache, or say which weights resolve and from where."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from histodiff.weights.fetch import fetch
from histodiff.errors import WeightsNotFoundError
from histodiff.weights.locate import default_cache_dir, locate_inception, locate_vgg16


def _check(wcfg: Any) -> int:
    missing = 0
    for what, locate in (("vgg16", locate_vgg16), ("inception", locate_inception)):
        try:
            print(f"{what}: {locate(wcfg)}")
        except WeightsNotFoundError as exc:
            print(f"{what}: MISSING - {exc}")
            missing += 1
    return 1 if missing else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m histodiff.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("fetch", "download and convert the weights into the cache"),
                       ("check", "report where each weights file resolves from; exit 1 if any is missing")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()} ($HISTODIFF_CACHE/weights)")
        if name == "check":
            p.add_argument("--vgg16-path", default=None)
            p.add_argument("--inception-path", default=None)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            fetch(Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir())
        except WeightsNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from histodiff.config import WeightsConfig

    return _check(WeightsConfig(vgg16_path=args.vgg16_path, inception_path=args.inception_path, cache_dir=args.cache_dir))
