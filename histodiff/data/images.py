"""Reading one tile image: a decompression-bomb limit per read, checks, conversion to RGB, resize and
centre crop to a square, and the inverse of the [-1, 1] normalisation."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where tensors are made: the tile checks and slide tiling run without it
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MIN_SIDE = 8  # below this an image has no tissue structure left to learn from


@contextmanager
def _pixel_limit(max_image_pixels: int) -> Iterator[None]:
    """Apply our own decompression-bomb limit for one read, and put PIL's global limit back after."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; a warning is still a refusal for us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def unreadable_reason(exc: BaseException) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a decompression bomb ({first_line(exc)})"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can identify"
    return f"unreadable ({type(exc).__name__}: {first_line(exc)})"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def inspect_image(path: Path, max_image_pixels: int) -> tuple[int, int] | str:
    """Open and fully check one image; (width, height) when usable, else the reason it is not."""
    try:
        with _pixel_limit(max_image_pixels):
            with Image.open(path) as im:
                im.verify()  # structure and checksums (PNG CRCs) without decoding
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_image_pixels:
                    return f"refused as a decompression bomb ({w}x{h} pixels > max_image_pixels {max_image_pixels})"
                if min(w, h) < MIN_SIDE:
                    return f"too small ({w}x{h}; at least {MIN_SIDE} px a side needed)"
                if im.format == "JPEG":
                    # DCT-scaled decode still reads the whole stream (catches truncation) at 1/8 the cost
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
                _to_rgb(im)  # refuses modes we cannot turn into RGB
                return (w, h)
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party decoder means "skip this file"
        return unreadable_reason(exc)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any common PIL mode to 8-bit RGB; transparency is composited on white (empty glass)."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8_grey(np.asarray(im))).convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    raise ValueError(f"unsupported image mode {mode}")


def _to_uint8_grey(a: np.ndarray) -> np.ndarray:
    """Scale 16-bit, 32-bit or float greyscale to 8 bits by its value range, never by clipping."""
    is_float, is_16bit = a.dtype.kind == "f", a.dtype.itemsize == 2
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if is_float and lo >= 0 and hi <= 1.0:
        scaled = a * 255.0
    elif is_float and lo >= 0 and hi <= 255.0:
        scaled = a
    elif is_16bit or (not is_float and lo >= 0 and hi <= 65535):
        scaled = a / 257.0  # the full 16-bit range onto 0..255, as 65535 / 257 == 255
    else:
        scaled = (a - lo) / max(hi - lo, 1e-12) * 255.0  # data of unknown range
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_square(path: Path, size: int, max_image_pixels: int) -> np.ndarray:
    """Read one tile as uint8 size x size x 3: shorter side to ``size`` (bicubic), centre crop."""
    with _pixel_limit(max_image_pixels):
        with Image.open(path) as im:
            w, h = im.size
            if im.format == "JPEG" and min(w, h) > 2 * size:
                im.draft("RGB", (w * size // min(w, h), h * size // min(w, h)))  # decode big JPEGs reduced
                w, h = im.size
            im = _to_rgb(im)
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            # resizing only the central square equals resize-then-centre-crop, without the waste
            out = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                            reducing_gap=3.0 if side > 3 * size else None)
            return np.asarray(out, dtype=np.uint8)


def from_uint8_image(pixels: np.ndarray) -> torch.Tensor:
    """The models' input: H x W x 3 uint8 array -> 3 x H x W float tensor in [-1, 1] (inverse of to_uint8_image)."""
    import torch

    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # PIL arrays are read-only


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """Invert the [-1, 1] normalisation: 3 x H x W tensor -> H x W x 3 uint8 array."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a 3 x H x W tensor, got shape {tuple(x.shape)}")
    import torch

    x = x.detach().float().cpu().clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
