"""The torch Dataset over a tile index: float32 3 x S x S tensors in [-1, 1] with their label."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from histodiff.data.images import from_uint8_image, load_square, unreadable_reason
from histodiff.data.tile_index import REPORT_FILE, TileIndex, scan_tiles
from histodiff.errors import InputError

log = logging.getLogger("histodiff.data")
_ANNOUNCED: set[tuple[str, int]] = set()  # (folder, size) whose resize was already stated in this process


@dataclass(frozen=True)
class TileOptions:
    """How a TileFolder serves its tiles: the side in pixels, whether to apply the 8 flips/rotations (training
    augmentation: tissue has no orientation), and the decompression-bomb limit for each read."""

    image_size: int
    augment: bool = False
    max_image_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise InputError(f"image_size must be positive, got {self.image_size}")


class TileFolder(torch.utils.data.Dataset):
    """Tiles as float32 3 x S x S tensors in [-1, 1] with their label (-1 when unlabeled).

    ``TileFolder.open(root, options, ...)`` scans (or reuses) a folder's index; ``TileFolder(index, options,
    subset)`` serves some of an index's tiles, e.g. a training split with augmentation and a validation
    split without.
    """

    def __init__(self, index: TileIndex, options: TileOptions, subset: list[int] | None = None) -> None:
        self.index = index
        self.classes = index.classes
        self.options = options
        self.positions = list(range(len(index.entries))) if subset is None else list(subset)
        bad = [i for i in self.positions if not 0 <= i < len(index.entries)]
        if bad:
            raise InputError(f"subset index {bad[0]} is out of range for {len(index.entries)} tiles in {index.root}")

    @classmethod
    def open(cls, root: str | Path, options: TileOptions, labels_csv: str | Path | None = None,
             work_dir: str | Path | None = None, labeled: bool | None = None,
             report_name: str = REPORT_FILE) -> "TileFolder":
        """The tiles under ``root``; see :func:`scan_tiles` for ``labels_csv``, ``work_dir``, ``labeled``."""
        if root is None:
            raise InputError("TileFolder needs a data folder")
        index = scan_tiles(root, labels_csv, work_dir, options.max_image_pixels, labeled, report_name)
        _announce_resize(index, options.image_size)
        return cls(index, options)

    @property
    def image_size(self) -> int:
        return self.options.image_size

    @property
    def augment(self) -> bool:
        return self.options.augment

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def labels(self) -> list[int]:
        return [self.index.entries[i][1] for i in self.positions]

    @property
    def groups(self) -> list[str | None]:
        """Each tile's slide or patient (None: unknown, the tile is its own group); see ``TileIndex.groups``."""
        groups = self.index.tile_groups()
        return [groups[i] for i in self.positions]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.index.entries[self.positions[i]]
        path = self.index.root / rel
        try:
            pixels = load_square(path, self.image_size, self.options.max_image_pixels)
        except Exception as exc:  # noqa: BLE001 - name the file instead of a bare decoder traceback
            raise InputError(
                f"tile {path} can no longer be read ({unreadable_reason(exc)}); it changed after indexing, rerun to re-index"
            ) from None
        x = from_uint8_image(pixels)
        if self.augment:
            # torch's RNG, so DataLoader workers get distinct, seedable streams
            k = int(torch.randint(0, 4, ()).item())
            if k:
                x = torch.rot90(x, k, dims=(1, 2))
            if torch.rand(()) < 0.5:
                x = torch.flip(x, dims=(2,))
        return x.contiguous(), label


def _announce_resize(index: TileIndex, image_size: int) -> None:
    """State once per folder (and process) that its tiles are served at another size than they have."""
    other = Counter(wh for wh in index.sizes if wh != (image_size, image_size))
    key = (str(index.root), image_size)
    if not other or key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    sizes = ", ".join(f"{w}x{h} px ({n})" for (w, h), n in other.most_common(3))
    more = f" and {len(other) - 3} other size(s)" if len(other) > 3 else ""
    log.info("%d of %d tiles under %s are %s%s: resized (shorter side) and centre-cropped to %dx%d px "
             "(tiles.image_size)", sum(other.values()), len(index.sizes), index.root, sizes, more, image_size,
             image_size)


def tile_dataset_from_config(cfg: Any, train: bool = True, data: str | Path | None = None,
                             labels: str | Path | None = None) -> TileFolder:
    """The TileFolder a config describes: ``cfg.data``/``cfg.labels`` unless given, ``cfg.tiles.*``."""
    data = data if data is not None else cfg.data
    labels = labels if labels is not None else cfg.labels
    if data is None:
        raise InputError("no data folder given (set data=DIR)")
    work_dir = cfg.work_dir or cfg.run_dir
    tiles = cfg.tiles
    return TileFolder.open(data, TileOptions(tiles.image_size, augment=bool(train and tiles.random_flip), max_image_pixels=tiles.max_image_pixels), labels_csv=labels, work_dir=work_dir)
