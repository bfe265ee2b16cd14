"""Tissue on a slide thumbnail: Otsu's threshold on HSV saturation, and the tissue fraction of grid cells."""

from __future__ import annotations

import numpy as np
from PIL import Image

SATURATION_FLOOR = 20  # out of 255: below this a pixel is glass whatever Otsu says (an empty thumbnail)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t that best separates ``<= t`` from ``> t``."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    below = np.cumsum(hist)
    above = below[-1] - below
    moment = np.cumsum(hist * np.arange(256))
    mean_below = moment / np.maximum(below, 1)
    mean_above = (moment[-1] - moment) / np.maximum(above, 1)
    return int(np.argmax(below * above * (mean_below - mean_above) ** 2))


def tissue_mask(thumbnail: Image.Image) -> np.ndarray:
    """True where the thumbnail shows tissue: HSV saturation above Otsu's threshold (and a floor for glass)."""
    saturation = np.asarray(thumbnail.convert("RGB").convert("HSV"))[..., 1]
    return saturation > max(otsu_threshold(saturation), SATURATION_FLOOR)


def tissue_fractions(mask: np.ndarray, dims: tuple[int, int], step: tuple[int, int],
                     cells: tuple[int, int]) -> np.ndarray:
    """Tissue fraction of every cell of a grid (rows x columns) with level-0 spacing ``step`` on a slide of level-0
    size ``dims``, from its thumbnail's ``mask`` by an integral image."""
    h, w = mask.shape

    def edges(n: int, step: int, scale: float, size: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(n + 1) * step * scale
        lo = np.clip(np.floor(pos[:-1]).astype(int), 0, size - 1)
        return lo, np.clip(np.maximum(np.ceil(pos[1:]).astype(int), lo + 1), 1, size)

    x0, x1 = edges(cells[0], step[0], w / dims[0], w)
    y0, y1 = edges(cells[1], step[1], h / dims[1], h)
    ii = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    inside = ii[np.ix_(y1, x1)] - ii[np.ix_(y0, x1)] - ii[np.ix_(y1, x0)] + ii[np.ix_(y0, x0)]
    return inside / np.outer(y1 - y0, x1 - x0)
