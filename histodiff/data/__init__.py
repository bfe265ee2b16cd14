"""Paper stage 0, the data: tile folders (image decoding ``images``, the verified and cached index
``tile_index``, labels and slides ``tile_labels``, the torch dataset ``tile_dataset``), whole slides to tiles (``slide_*``), and procedural
phantom H&E tiles with per-site stain styles (``phantom_tissue``, ``stain``)."""

from histodiff.data.images import to_uint8_image
from histodiff.data.phantom_tissue import CLASSES, generate_tile, write_phantom_site
from histodiff.data.stain import StainStyle, render, site_style
from histodiff.data.tile_dataset import TileFolder, TileOptions, tile_dataset_from_config
from histodiff.data.tile_index import TileIndex, scan_tiles

__all__ = [
    "CLASSES",
    "StainStyle",
    "TileFolder",
    "TileIndex",
    "TileOptions",
    "generate_tile",
    "render",
    "scan_tiles",
    "site_style",
    "tile_dataset_from_config",
    "to_uint8_image",
    "write_phantom_site",
]
