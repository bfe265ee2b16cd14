"""Tile data: verified tile folders for training, and procedural phantom H&E tiles with site stain styles."""

from histodiff.data.phantom_tissue import CLASSES, generate_tile, write_phantom_site
from histodiff.data.stain import StainStyle, render, site_style
from histodiff.data.tiles import TileFolder, TileIndex, scan_tiles, tile_dataset_from_config, to_uint8_image

__all__ = [
    "CLASSES",
    "StainStyle",
    "TileFolder",
    "TileIndex",
    "generate_tile",
    "render",
    "scan_tiles",
    "site_style",
    "tile_dataset_from_config",
    "to_uint8_image",
    "write_phantom_site",
]
