"""Tile whole-slide images into tissue tiles for a site: ``python -m histodiff.slides --slides DIR --out DIR``.

Every slide OpenSlide reads (SVS, NDPI, MRXS, SCN, DICOM, generic tiled TIFF, ...) in --slides and its direct
sub-folders gives tiles of --tile-size pixels at --mpp microns per pixel wherever at least --min-tissue of the
tile is tissue. Output: OUT/<slide>/<slide>_x<X>_y<Y>.png (OUT/<class>/<slide>/... with --labels) and
OUT/manifest.csv (slide, path, level, x, y, mpp, tissue[, label]). A rerun skips finished slides. A slide that
cannot be read, or shows no tissue, is reported in one line and skipped. Exit code 0 when at least one slide gave
tiles, 2 when none did.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

log = logging.getLogger("histodiff.slides")
_MARK = "_histodiff_handler"  # histodiff.logs.remove_handlers detaches handlers carrying this mark


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bars apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never end the run
            self.handleError(record)


def _setup_logging() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    logging.getLogger("histodiff").setLevel(logging.INFO)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m histodiff.slides", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", default=None, metavar="DIR", help="folder of whole-slide images")
    p.add_argument("--out", default=None, metavar="DIR", help="folder the tiles and manifest.csv go to")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the tiles (default 0.5)")
    p.add_argument("--tile-size", type=int, default=256, help="tile side in pixels (default 256)")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="fraction of a tile that must be tissue (default 0.5)")
    p.add_argument("--labels", default=None, metavar="CSV",
                   help="'slide,class' CSV (slide: file name or stem); tiles go to OUT/<class>/<slide>/")
    p.add_argument("--limit-per-slide", type=int, default=None, metavar="N",
                   help="at most N tiles per slide, spread evenly over its tissue")
    p.add_argument("--assume-mpp", type=float, default=None, metavar="X",
                   help="level-0 microns per pixel for slides whose metadata has none (default: the --mpp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    from histodiff.data.slide_tiling import TilingParams, describe, tile_slides
    from histodiff.errors import InputError

    for option, value in (("--slides", args.slides), ("--out", args.out)):
        if not value:
            print(f"error: {option} DIR is required (python -m histodiff.slides --slides DIR --out DIR)",
                  file=sys.stderr)
            return 2
    params = TilingParams(mpp=args.mpp, tile_size=args.tile_size, min_tissue=args.min_tissue,
                          limit=args.limit_per_slide, assume_mpp=args.assume_mpp)
    try:
        summary = tile_slides(args.slides, args.out, params, labels_csv=args.labels,
                              progress=False if args.no_progress else None)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = summary.results
    good = summary.with_tiles
    if not good:
        first = summary.skipped[0]
        print(f"error: none of the {len(results)} slide(s) in {args.slides} gave tiles "
              f"(first: {describe(first.slide)}: {first.reason})", file=sys.stderr)
        return 2
    done_before = sum(r.status == "done" for r in results)
    log.info("%d tiles from %d of %d slide(s) in %s (%d finished earlier, %d skipped); manifest: %s",
             sum(r.tiles for r in good), len(good), len(results), summary.out, done_before,
             len(summary.skipped), summary.out / "manifest.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
