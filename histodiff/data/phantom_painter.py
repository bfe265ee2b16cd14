"""The canvas of a phantom H&E tile: haematoxylin, eosin, blood and neutral concentration maps, and the
drawing primitives (blobs, nuclei, fibres, textures) the class recipes in ``phantom_tissue`` share.

Geometry is in reference pixels (0.5 um, a 224 px tile), so any tile size shows the same field of view.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

REFERENCE_SIZE = 224  # reference pixels across a tile at zoom 1


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the first two axes with mirrored edges (numpy only, no BLAS threads)."""
    if sigma < 0.25:
        return a
    radius = min(max(1, int(3 * sigma + 0.5)), min(a.shape[:2]) - 1)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2).astype(np.float32)
    kernel /= kernel.sum()
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (a.ndim - 2)
    padded = np.pad(a.astype(np.float32, copy=False), pad, mode="symmetric")
    h, w = a.shape[:2]
    rows = np.zeros((h, w + 2 * radius) + a.shape[2:], np.float32)
    for i, k in enumerate(kernel):
        rows += k * padded[i:i + h]
    out = np.zeros(a.shape, np.float32)
    for i, k in enumerate(kernel):
        out += k * rows[:, i:i + w]
    return out


class Painter:
    """Stain concentration maps of one tile and the drawing primitives the class recipes share."""

    def __init__(self, size: int, rng: np.random.Generator, zoom: float) -> None:
        self.n = size
        self.rng = rng
        self.u = size / REFERENCE_SIZE * zoom  # pixels per reference pixel
        self.fov = size / self.u  # field of view in reference pixels
        self.area = (self.fov / REFERENCE_SIZE) ** 2  # object counts scale with this
        self.h = np.zeros((size, size), np.float32)
        self.e = np.zeros((size, size), np.float32)
        self.blood = np.zeros((size, size), np.float32)
        self.neutral = np.zeros((size, size), np.float32)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.x, self.y = xx, yy
        self.grain = self.normalise(self.blur(rng.random((size, size), dtype=np.float32), 0.6 * max(self.u, 0.5)))

    # -- fields
    def blur(self, a: np.ndarray, sigma_px: float) -> np.ndarray:
        return gaussian_blur(a, sigma_px)

    @staticmethod
    def normalise(a: np.ndarray) -> np.ndarray:
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / max(hi - lo, 1e-6)

    def noise(self, feature_ref: float) -> np.ndarray:
        """Smooth value noise in [0, 1] whose blobs are about ``feature_ref`` reference pixels wide."""
        cells = max(1, int(round(self.fov / feature_ref)))
        grid = self.rng.random((cells + 3, cells + 3), dtype=np.float32)
        off = self.rng.random(2) * 0.999
        box = (1 + off[0], 1 + off[1], 1 + off[0] + cells, 1 + off[1] + cells)
        up = Image.fromarray(grid).resize((self.n, self.n), Image.Resampling.BICUBIC, box=box)
        return np.clip(np.asarray(up, dtype=np.float32), 0.0, 1.0)

    def fractal(self, feature_ref: float, octaves: int = 3) -> np.ndarray:
        total, weight, amp = np.zeros((self.n, self.n), np.float32), 0.0, 1.0
        for k in range(octaves):
            total += amp * self.noise(max(feature_ref / 2**k, 2.0))
            weight += amp
            amp *= 0.5
        return total / weight

    def streaks(self, theta: float, across_ref: float, along_ref: float, wave_ref: float = 0.0,
                bend_ref: float = 80.0) -> np.ndarray:
        """Anisotropic noise in [0, 1] drawn out along ``theta``: fibres, fibrils, mucus strands.

        Blobs are ``across_ref`` wide and ``along_ref`` long; ``wave_ref`` bends them sideways by up to
        that many reference pixels over a length of about ``bend_ref``.
        """
        span = self.fov * 1.5  # covers the tile at any rotation, plus the bending
        cells_a = max(2, int(span / across_ref))
        cells_l = max(2, int(span / along_ref))
        grid = self.rng.random((cells_a + 3, cells_l + 3), dtype=np.float32)
        res_a, res_l = min(4 * cells_a + 1, 1024), min(4 * cells_l + 1, 1024)
        field = np.asarray(Image.fromarray(grid).resize((res_l, res_a), Image.Resampling.BICUBIC,
                                                        box=(1, 1, 1 + cells_l, 1 + cells_a)), dtype=np.float32)
        xr, yr = (self.x - self.n / 2) / self.u, (self.y - self.n / 2) / self.u
        along = xr * np.cos(theta) + yr * np.sin(theta)
        across = -xr * np.sin(theta) + yr * np.cos(theta)
        if wave_ref > 0:
            across = across + (self.noise(bend_ref) - 0.5) * 2 * wave_ref
        ia = np.clip((across / span + 0.5) * (res_a - 1), 0, res_a - 1.001)
        il = np.clip((along / span + 0.5) * (res_l - 1), 0, res_l - 1.001)
        a0, l0 = ia.astype(np.int64), il.astype(np.int64)
        fa, fl = ia - a0, il - l0
        top = field[a0, l0] * (1 - fl) + field[a0, l0 + 1] * fl
        bottom = field[a0 + 1, l0] * (1 - fl) + field[a0 + 1, l0 + 1] * fl
        return np.clip(top * (1 - fa) + bottom * fa, 0.0, 1.0)

    # -- positions
    def uniform_points(self, count: float, margin_ref: float = 10.0) -> np.ndarray:
        k = int(self.rng.poisson(max(count, 0.0)))
        m = margin_ref * self.u
        return self.rng.uniform(-m, self.n + m, size=(k, 2)).astype(np.float32)

    def grid_points(self, spacing_ref: float, jitter: float, keep: float) -> np.ndarray:
        """A jittered lattice: the packing of crowded cells (lymphocytes, tumour)."""
        step = spacing_ref * self.u
        ticks = np.arange(-step, self.n + step, step, dtype=np.float32)
        gx, gy = np.meshgrid(ticks, ticks)
        pts = np.stack([gx.ravel(), gy.ravel()], 1)
        pts += self.rng.uniform(-0.5, 0.5, pts.shape).astype(np.float32) * jitter * step
        pts += self.rng.uniform(0, step, 2).astype(np.float32)
        return pts[self.rng.random(len(pts)) < keep]

    def masked(self, pts: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Keep the points that fall where ``mask`` (in [0, 1]) says, as a probability."""
        if len(pts) == 0:
            return pts
        ij = np.clip(pts.astype(np.int64), 0, self.n - 1)
        return pts[self.rng.random(len(pts)) < mask[ij[:, 1], ij[:, 0]]]

    # -- shapes
    def shapes(self, pts: np.ndarray, a_ref, b_ref, theta, values, irregular: float = 0.0,
               canvas: np.ndarray | None = None, vertices: int = 12) -> np.ndarray:
        """Filled (irregular) ellipses at ``pts``; semi-axes in reference pixels, one value each."""
        k = len(pts)
        img = Image.fromarray(canvas if canvas is not None else np.zeros((self.n, self.n), np.float32))
        if k == 0:
            return np.asarray(img, dtype=np.float32).copy()
        a = np.broadcast_to(np.asarray(a_ref, np.float32), (k,)) * self.u
        b = np.broadcast_to(np.asarray(b_ref, np.float32), (k,)) * self.u
        th = np.broadcast_to(np.asarray(theta, np.float32), (k,))
        val = np.broadcast_to(np.asarray(values, np.float32), (k,))
        phi = np.linspace(0, 2 * np.pi, vertices, endpoint=False, dtype=np.float32)
        r = np.ones((k, vertices), np.float32)
        if irregular > 0:
            # low harmonics give lumpy, pleomorphic outlines rather than jagged ones
            for harmonic in (2, 3, 4):
                amp = self.rng.normal(0, irregular / harmonic, (k, 1)).astype(np.float32)
                ph = self.rng.uniform(0, 2 * np.pi, (k, 1)).astype(np.float32)
                r = r + amp * np.cos(harmonic * phi + ph)
            r = np.clip(r, 0.35, 1.8)
        ex, ey = a[:, None] * r * np.cos(phi), b[:, None] * r * np.sin(phi)
        c, s = np.cos(th)[:, None], np.sin(th)[:, None]
        px = pts[:, :1] + ex * c - ey * s
        py = pts[:, 1:] + ex * s + ey * c
        draw = ImageDraw.Draw(img)
        for i in range(k):
            draw.polygon(list(zip(px[i].tolist(), py[i].tolist())), fill=float(val[i]))
        return np.asarray(img, dtype=np.float32).copy()

    def nuclei(self, pts: np.ndarray, a_ref, b_ref, theta, darkness, irregular: float = 0.1,
               vesicular: float = 0.0) -> np.ndarray:
        """Haematoxylin of nuclei: soft edges and chromatin grain; vesicular ones have pale centres."""
        m = self.shapes(pts, a_ref, b_ref, theta, darkness, irregular)
        if vesicular > 0 and len(pts):
            k = len(pts)
            a = np.broadcast_to(np.asarray(a_ref, np.float32), (k,)) * 0.55
            b = np.broadcast_to(np.asarray(b_ref, np.float32), (k,)) * 0.55
            hollow = self.shapes(pts, a, b, theta, 1.0, irregular)
            m = m * (1 - vesicular * hollow)
            nucleoli = self.shapes(pts + self.rng.normal(0, 1.0, pts.shape).astype(np.float32) * self.u,
                                   2.2, 2.2, 0.0, np.broadcast_to(np.asarray(darkness, np.float32), (k,)) * 0.9)
            m = np.maximum(m, nucleoli * (self.rng.random() < 0.7))
        m = self.blur(m, 0.45 * max(self.u, 0.6))
        return m * (0.65 + 0.7 * self.grain)

    def voronoi_edges(self, spacing_ref: float, width_ref: float, warp: float = 0.15) -> np.ndarray:
        """Walls between polygonal cells (fat cells): 1 on a wall, falling to 0 inside."""
        pts = self.grid_points(spacing_ref, 0.9, 1.0)
        amp = warp * spacing_ref * self.u
        x = self.x + (self.noise(spacing_ref) - 0.5) * 2 * amp
        y = self.y + (self.noise(spacing_ref) - 0.5) * 2 * amp
        d1 = np.full((self.n, self.n), np.inf, np.float32)
        d2 = d1.copy()
        for px, py in pts:
            d = np.sqrt((x - px) ** 2 + (y - py) ** 2)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
        gap = (d2 - d1) / (2 * max(width_ref * self.u, 0.35))
        return np.exp(-gap**2)

    def region(self, feature_ref: float, fraction: float) -> np.ndarray:
        """A soft random region covering about ``fraction`` of the tile."""
        nz = self.noise(feature_ref)
        cut = float(np.quantile(nz, 1 - fraction))
        return np.clip((nz - cut) / 0.08 + 0.5, 0.0, 1.0)
