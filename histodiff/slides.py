"""Tile whole-slide images into tissue tiles: ``python -m histodiff.slides --slides DIR --out DIR`` (see --help)."""

from histodiff.cli.tile_slides import main

if __name__ == "__main__":
    raise SystemExit(main())
