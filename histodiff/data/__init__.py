"""Paper stage 0, the data: tile folders (image decoding ``images``, the verified and cached index
``tile_index``, labels and slides ``tile_labels``, the torch dataset ``tile_dataset``), whole slides to tiles (``slide_*``), and procedural
phantom H&E tiles with per-site stain styles (``phantom_tissue``, ``stain``)."""

import importlib

# names -> their modules, imported on first use (PEP 562): the tile index and slide tiling need no torch, so the
# launchers (client.run) that check a site's tiles stay small
_WHERE = {
    "to_uint8_image": "images",
    "CLASSES": "phantom_tissue", "generate_tile": "phantom_tissue", "write_phantom_site": "phantom_tissue",
    "StainStyle": "stain", "render": "stain", "site_style": "stain",
    "TileFolder": "tile_dataset", "TileOptions": "tile_dataset", "tile_dataset_from_config": "tile_dataset",
    "TileIndex": "tile_index", "scan_tiles": "tile_index",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"histodiff.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'histodiff.data' has no attribute {name!r}")


__all__ = sorted(_WHERE)
