"""Procedural H&E-like phantom tiles of the nine CRC tissue classes, rendered in a site's stain style.

Numpy and PIL only. Geometry is in reference pixels (0.5 um, a 224 px tile), so any tile size shows
the same field of view; classes share textures and borrow from their neighbours on purpose. The canvas and
its drawing primitives are ``phantom_painter``.

Length: about 350 lines, the nine class recipes and the ingredients they share, kept together so that a
class's look reads beside the structures it borrows from its neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from histodiff.data.phantom_painter import Painter
from histodiff.data.stain import StainStyle, render, site_style

CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


# ---------------------------------------------------------------------------- shared ingredients


def _lymphocytes(p: Painter, pts: np.ndarray) -> None:
    k = len(pts)
    r = p.rng.uniform(5.0, 7.0, k)
    p.h = np.maximum(p.h, p.nuclei(pts, r, r * p.rng.uniform(0.85, 1.0, k), p.rng.uniform(0, np.pi, k),
                                   p.rng.uniform(0.8, 1.15, k), irregular=0.08))


def _stroma(p: Painter, theta: float, width: float, wave: float, strength: float, loose: float) -> np.ndarray:
    """Collagen: bundles of eosin fibres ``width`` wide, bent by ``wave``; ``loose`` opens gaps between them."""
    fine = p.streaks(theta, width, width * p.rng.uniform(6, 14), wave, 70)
    coarse = p.streaks(theta + p.rng.normal(0, 0.2), width * 3, width * 20, wave, 70)
    f = np.clip((0.6 * fine + 0.4 * coarse - 0.5 * loose) / (1 - 0.5 * loose), 0, 1)
    return strength * (0.15 + 0.85 * f**1.3) * (0.7 + 0.6 * p.fractal(40))


def _spindles(p: Painter, count: float, theta: float, spread: float, length: tuple[float, float],
              mask: np.ndarray | None = None) -> None:
    pts = p.uniform_points(count)
    pts = pts if mask is None else p.masked(pts, mask)
    k = len(pts)
    a = p.rng.uniform(*length, k)
    b = p.rng.uniform(3.0, 4.5, k)
    p.h = np.maximum(p.h, p.nuclei(pts, a, b, theta + p.rng.normal(0, spread, k), p.rng.uniform(0.55, 0.9, k),
                                   irregular=0.06))


def _tumour_cells(p: Painter, mask: np.ndarray, spacing: float, keep: float, size: float, irregular: float) -> None:
    pts = p.masked(p.grid_points(spacing, 0.8, keep), mask)
    k = len(pts)
    r = size * np.exp(p.rng.normal(0, 0.25, k))  # pleomorphism: sizes spread widely
    p.h = np.maximum(p.h, p.nuclei(pts, r, r * p.rng.uniform(0.55, 1.0, k), p.rng.uniform(0, np.pi, k),
                                   p.rng.uniform(0.45, 1.0, k), irregular=irregular,
                                   vesicular=p.rng.uniform(0.0, 0.6)))


def _fragments(p: Painter, mask: np.ndarray, density: float) -> None:
    """Karyorrhexis: small dark nuclear fragments scattered through necrosis."""
    pts = p.masked(p.uniform_points(density * p.area), mask)
    k = len(pts)
    r = p.rng.uniform(1.5, 4.0, k)
    frag = p.shapes(pts, r, r * p.rng.uniform(0.5, 1.0, k), p.rng.uniform(0, np.pi, k),
                    p.rng.uniform(0.7, 1.5, k), irregular=0.35, vertices=7)
    p.h = np.maximum(p.h, p.blur(frag, 0.4 * max(p.u, 0.6)) * (0.7 + 0.6 * p.grain))


def _blood(p: Painter, mask: np.ndarray, strength: float) -> None:
    pts = p.masked(p.grid_points(9.0, 0.7, 0.9), mask)
    k = len(pts)
    cells = p.shapes(pts, 4.8, 4.8 * p.rng.uniform(0.8, 1.0, k), p.rng.uniform(0, np.pi, k),
                     strength * p.rng.uniform(0.6, 1.0, k))
    p.blood = np.maximum(p.blood, p.blur(cells, 0.5 * max(p.u, 0.6)))


def _glands(p: Painter, count: int, crowded: float, lumen: tuple[float, float]) -> np.ndarray:
    """Crypts: an epithelial ring (cytoplasm, goblet vacuoles, basal columnar nuclei) round a lumen.

    ``crowded`` in [0, 1] moves the ring from normal (one row, tidy) towards tumour (stratified, atypical).
    Returns the mask of gland tissue (lumen and ring) so callers keep stroma out of it.
    """
    occupied = np.zeros((p.n, p.n), np.float32)
    nucleus_pts, nucleus_a, nucleus_b, nucleus_t = [], [], [], []
    goblets = []
    for _ in range(count):
        cx, cy = p.rng.uniform(-0.1, 1.1, 2) * p.n
        radius = p.rng.uniform(60, 120)
        aspect = p.rng.uniform(0.6, 1.0)
        rot = p.rng.uniform(0, np.pi)
        lum = p.rng.uniform(*lumen)
        dx, dy = p.x - cx, p.y - cy
        lx = (dx * np.cos(rot) + dy * np.sin(rot)) / (radius * p.u)
        ly = (-dx * np.sin(rot) + dy * np.cos(rot)) / (radius * aspect * p.u)
        wobble = 1 + (p.noise(radius) - 0.5) * (0.2 + 0.6 * crowded)  # atypical glands are misshapen
        rho = np.sqrt(lx**2 + ly**2) * wobble
        ring = np.clip((1.0 - rho) / 0.05, 0, 1) * np.clip((rho - lum) / 0.05, 0, 1)
        inside = np.clip((1.0 - rho) / 0.05, 0, 1)
        p.e = p.e * (1 - inside) + ring * p.rng.uniform(0.3, 0.5)
        p.h = p.h * (1 - inside) + ring * 0.08
        occupied = np.maximum(occupied, inside)
        # nuclei sit basally, perpendicular to the basement membrane, packed along the perimeter
        perimeter = np.pi * radius * (1 + aspect)
        k = int(perimeter / (7.5 - 2.5 * crowded))
        for row in range(1 + int(crowded * 2.5)):
            phi = np.linspace(0, 2 * np.pi, k, endpoint=False) + p.rng.uniform(0, 6.3)
            rr = 0.86 - row * 0.1 * (1 - lum) + p.rng.normal(0, 0.02 + 0.04 * crowded, k)
            lx_, ly_ = rr * np.cos(phi) * radius * p.u, rr * np.sin(phi) * radius * aspect * p.u
            px = cx + lx_ * np.cos(rot) - ly_ * np.sin(rot)
            py = cy + lx_ * np.sin(rot) + ly_ * np.cos(rot)
            nucleus_pts.append(np.stack([px, py], 1))
            nucleus_a.append(p.rng.uniform(8.0, 12.0, k) * (1 + 0.5 * crowded * p.rng.random(k)))
            nucleus_b.append(p.rng.uniform(3.2, 4.2, k) * (1 + 0.6 * crowded * p.rng.random(k)))
            nucleus_t.append(np.arctan2(py - cy, px - cx))
        # goblet cells: mucin-filled vacuoles that a tumour mostly loses
        g = int(k * p.rng.uniform(0.2, 0.5) * (1 - crowded))
        phi = p.rng.uniform(0, 2 * np.pi, g)
        rr = (lum + 1) / 2 * p.rng.uniform(0.85, 1.0, g)
        lx_, ly_ = rr * np.cos(phi) * radius * p.u, rr * np.sin(phi) * radius * aspect * p.u
        goblets.append(np.stack([cx + lx_ * np.cos(rot) - ly_ * np.sin(rot),
                                 cy + lx_ * np.sin(rot) + ly_ * np.cos(rot)], 1))
    if goblets:
        pts = np.concatenate(goblets).astype(np.float32)
        r = p.rng.uniform(7.0, 12.0, len(pts))
        vac = p.blur(p.shapes(pts, r, r * 0.85, p.rng.uniform(0, np.pi, len(pts)), 1.0), 0.5 * max(p.u, 0.6))
        p.e = p.e * (1 - 0.9 * vac)
        p.h = p.h * (1 - vac) + vac * 0.05  # mucin stains faintly blue
    if nucleus_pts:
        pts = np.concatenate(nucleus_pts).astype(np.float32)
        nuc = p.nuclei(pts, np.concatenate(nucleus_a), np.concatenate(nucleus_b), np.concatenate(nucleus_t),
                       p.rng.uniform(0.7, 1.05, len(pts)), irregular=0.05 + 0.25 * crowded)
        p.h = np.maximum(p.h, nuc * occupied)
    return occupied


# ---------------------------------------------------------------------------- class recipes


def _adi(p: Painter) -> None:
    spacing = p.rng.uniform(70, 130)
    walls = p.voronoi_edges(spacing, p.rng.uniform(0.6, 1.4)) * (p.noise(25) > p.rng.uniform(0.0, 0.25))
    p.e = walls * p.rng.uniform(0.25, 0.6) * (0.5 + 0.9 * p.fractal(20)) + 0.02 * p.noise(40)
    p.h = walls * 0.06
    pts = p.masked(p.uniform_points(6 * p.area), np.clip(walls * 2 - 0.5, 0, 1))
    p.h = np.maximum(p.h, p.nuclei(pts, 10.0, 2.5, p.rng.uniform(0, np.pi, len(pts)), 0.9))
    if p.rng.random() < 0.3:  # a septum of fibrous stroma, as at the edge of a fat lobule
        band = p.region(90, p.rng.uniform(0.15, 0.4))
        p.e = p.e * (1 - band) + band * _stroma(p, p.rng.uniform(0, np.pi), 5, 15, 0.5, 0.5)
        _spindles(p, 8 * p.area, p.rng.uniform(0, np.pi), 0.5, (10, 18), mask=band)
    if p.rng.random() < 0.15:
        _blood(p, p.region(40, 0.06), 0.8)


def _back(p: Painter) -> None:
    p.e = 0.025 * p.fractal(60)
    p.h = 0.02 * p.fractal(60)
    p.neutral = 0.03 * p.noise(150) + 0.02 * p.fractal(15)
    kind = p.rng.random()
    if kind < 0.35:  # out-of-focus tissue at the slide edge, the border case with MUC and DEB
        frag = p.region(120, p.rng.uniform(0.1, 0.45))
        p.e += frag * p.rng.uniform(0.15, 0.5) * p.fractal(25)
        p.h += frag * p.rng.uniform(0.05, 0.35) * p.fractal(15)
        sigma = p.rng.uniform(2.0, 6.0) * p.u
        p.e, p.h = p.blur(p.e, sigma), p.blur(p.h, sigma)
    elif kind < 0.5:  # pen ink, label shadow or a fold: grey-dark
        p.neutral += p.blur(p.region(150, p.rng.uniform(0.2, 0.9)), 4 * p.u) * p.rng.uniform(0.1, 0.5)
    specks = p.uniform_points(p.rng.uniform(2, 12) * p.area)
    r = p.rng.uniform(1.0, 4.0, len(specks))
    dust = p.shapes(specks, r, r * p.rng.uniform(0.3, 1, len(specks)), p.rng.uniform(0, np.pi, len(specks)),
                    p.rng.uniform(0.2, 0.8, len(specks)), irregular=0.3)
    p.neutral += p.blur(dust, 0.5 * max(p.u, 0.6))
    if p.rng.random() < 0.3:
        _fragments(p, np.ones((p.n, p.n), np.float32), p.rng.uniform(5, 40))


def _deb(p: Painter) -> None:
    mottle = np.clip(p.fractal(p.rng.uniform(15, 40)) * 1.6 - 0.3, 0, 1)
    p.e = p.rng.uniform(0.3, 0.8) * mottle
    p.h = p.rng.uniform(0.08, 0.3) * p.fractal(20)  # smeared nuclear dust tints necrosis purple
    _fragments(p, mottle * 0.8 + 0.2, p.rng.uniform(80, 300))
    ghosts = p.uniform_points(p.rng.uniform(5, 25) * p.area)
    r = p.rng.uniform(7, 11, len(ghosts))
    p.h = np.maximum(p.h, 0.3 * p.nuclei(ghosts, r, r * 0.8, p.rng.uniform(0, np.pi, len(ghosts)), 1.0, 0.2))
    if p.rng.random() < 0.4:  # haemorrhage inside necrosis
        _blood(p, p.region(50, p.rng.uniform(0.2, 0.9)), p.rng.uniform(0.6, 1.1))
    if p.rng.random() < 0.3:  # viable tumour at the border of the necrosis
        _tumour_cells(p, p.region(70, p.rng.uniform(0.2, 0.5)), 24, 0.8, 12.0, 0.25)
    if p.rng.random() < 0.25:
        _lymphocytes(p, p.uniform_points(p.rng.uniform(30, 120) * p.area))


def _lym(p: Painter) -> None:
    dense = p.rng.random() < 0.7
    spacing = p.rng.uniform(13, 16) if dense else p.rng.uniform(16, 24)
    keep = p.rng.uniform(0.8, 1.0) if dense else p.rng.uniform(0.35, 0.7)
    p.e = p.rng.uniform(0.1, 0.3) * p.fractal(30)
    if not dense or p.rng.random() < 0.3:  # lymphoid tissue in stroma: the border case with STR and DEB
        p.e = np.maximum(p.e, _stroma(p, p.rng.uniform(0, np.pi), 5, 20, 0.45, 0.5))
    pts = p.masked(p.grid_points(spacing, 0.9, keep), 0.4 + 0.6 * p.region(80, 0.7))
    _lymphocytes(p, pts)
    if p.rng.random() < 0.3:
        _tumour_cells(p, p.region(60, 0.1), 24, 0.6, 11.0, 0.2)


def _muc(p: Painter) -> None:
    theta = p.rng.uniform(0, np.pi)
    wisps = p.streaks(theta, p.rng.uniform(3, 8), p.rng.uniform(30, 80), p.rng.uniform(10, 40), 50) ** 2.5
    wisps2 = p.streaks(theta + p.rng.normal(0, 0.6), p.rng.uniform(4, 10), 40, 30, 40) ** 2
    pools = 1 - 0.85 * p.region(90, p.rng.uniform(0.0, 0.5))
    p.e = (p.rng.uniform(0.1, 0.3) * wisps + 0.03 + 0.05 * p.fractal(20)) * pools
    p.h = (p.rng.uniform(0.1, 0.35) * wisps2 + 0.04 * p.fractal(20)) * pools  # mucin is faintly basophilic
    if p.rng.random() < 0.35:  # a strand of stroma crossing the mucus lake
        band = p.region(60, p.rng.uniform(0.05, 0.25))
        p.e = np.maximum(p.e, band * _stroma(p, theta, 4, 10, 0.6, 0.3))
    if p.rng.random() < 0.5:  # floating cells
        pts = p.uniform_points(p.rng.uniform(2, 8) * p.area)
        p.e = np.maximum(p.e, p.blur(p.shapes(pts, 16, 12, p.rng.uniform(0, np.pi, len(pts)), 0.3, 0.2), p.u))
        r = p.rng.uniform(5.0, 8.0, len(pts))
        p.h = np.maximum(p.h, p.nuclei(pts, r, r * 0.8, p.rng.uniform(0, np.pi, len(pts)), 1.0, 0.15))


def _mus(p: Painter) -> None:
    theta = p.rng.uniform(0, np.pi)
    wavy = p.rng.random() < 0.25  # relaxed muscle looks like dense stroma
    f = p.streaks(theta, p.rng.uniform(2.5, 5), p.rng.uniform(40, 90), p.rng.uniform(8, 20) if wavy else 3, 90)
    cells = p.streaks(theta, p.rng.uniform(8, 14), 120, 3 if not wavy else 15, 90)  # cell-to-cell shading
    p.e = p.rng.uniform(0.5, 0.9) * (0.55 + 0.3 * f + 0.3 * cells) * (0.8 + 0.4 * p.fractal(40))
    if p.rng.random() < 0.5:  # clefts between bundles
        clefts = np.clip((p.streaks(theta, 6, 150, 5, 90) - 0.82) / 0.08, 0, 1)
        p.e *= 1 - 0.85 * clefts
    p.h = 0.06 * p.fractal(30)
    _spindles(p, p.rng.uniform(8, 22) * p.area, theta, 0.35 if wavy else 0.12, (14, 26))
    if p.rng.random() < 0.2:
        _lymphocytes(p, p.uniform_points(p.rng.uniform(5, 30) * p.area))


def _str(p: Painter) -> None:
    theta = p.rng.uniform(0, np.pi)
    compact = p.rng.random() < 0.3  # dense straight collagen: the border case with MUS
    p.e = _stroma(p, theta, p.rng.uniform(3, 5) if compact else p.rng.uniform(3, 8),
                  p.rng.uniform(3, 10) if compact else p.rng.uniform(10, 35),
                  p.rng.uniform(0.45, 0.8) if compact else p.rng.uniform(0.3, 0.65),
                  0.1 if compact else p.rng.uniform(0.3, 0.8)) + 0.03
    p.h = 0.05 * p.fractal(30)
    _spindles(p, p.rng.uniform(3, 12) * p.area, theta, 0.25 if compact else 0.6, (10, 20))
    if p.rng.random() < 0.4:
        _lymphocytes(p, p.uniform_points(p.rng.uniform(5, 40) * p.area))
    if p.rng.random() < 0.15:
        _blood(p, p.region(30, 0.05), 0.8)
    if p.rng.random() < 0.15:  # desmoplastic stroma holding a few tumour cells
        _tumour_cells(p, p.region(50, 0.15), 24, 0.7, 12.0, 0.25)


def _norm(p: Painter) -> None:
    p.e = _stroma(p, p.rng.uniform(0, np.pi), 6, 25, p.rng.uniform(0.25, 0.45), 0.4)
    p.h = 0.05 * p.fractal(30)
    _lymphocytes(p, p.uniform_points(p.rng.uniform(30, 90) * p.area))
    crowded = p.rng.uniform(0.4, 0.8) if p.rng.random() < 0.2 else p.rng.uniform(0.0, 0.2)
    _glands(p, int(p.rng.integers(1, 3)), crowded, (0.25, 0.5))


def _tum(p: Painter) -> None:
    p.e = p.rng.uniform(0.3, 0.6) * (0.7 + 0.3 * p.fractal(25))
    p.h = p.rng.uniform(0.08, 0.2) * p.fractal(25)
    if p.rng.random() < 0.3:  # tumour glands that still resemble crypts: the border case with NORM
        _glands(p, int(p.rng.integers(1, 3)), p.rng.uniform(0.6, 1.0), (0.1, 0.35))
    _tumour_cells(p, np.ones((p.n, p.n), np.float32), p.rng.uniform(20, 28), p.rng.uniform(0.7, 0.95),
                  p.rng.uniform(10.0, 15.0), p.rng.uniform(0.15, 0.35))
    lumens = p.region(p.rng.uniform(30, 70), p.rng.uniform(0.0, 0.25))  # irregular atypical lumens
    p.e, p.h = p.e * (1 - lumens), p.h * (1 - lumens)
    if p.rng.random() < 0.4:  # dirty necrosis in the lumens
        _fragments(p, lumens, p.rng.uniform(100, 300))
        p.e += lumens * 0.3 * p.fractal(15)


_RECIPES: dict[str, Callable[[Painter], None]] = {
    "ADI": _adi, "BACK": _back, "DEB": _deb, "LYM": _lym, "MUC": _muc,
    "MUS": _mus, "NORM": _norm, "STR": _str, "TUM": _tum,
}

# Tissue that borders each class in a section; a tile cut at a border shows a patch of it.
NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "ADI": ("STR", "BACK"), "BACK": ("ADI", "MUC", "DEB"), "DEB": ("TUM", "LYM", "MUC"),
    "LYM": ("STR", "DEB", "TUM"), "MUC": ("BACK", "STR", "TUM"), "MUS": ("STR", "ADI"),
    "NORM": ("TUM", "LYM", "STR"), "STR": ("MUS", "LYM", "ADI"), "TUM": ("DEB", "NORM", "STR"),
}
BORDER_PROB = 0.2  # share of tiles with a patch of a neighbouring tissue (the label stays the majority)


# ---------------------------------------------------------------------------- public API


def generate_tile(label: int | str, size: int, rng: np.random.Generator, style: StainStyle) -> np.ndarray:
    """One phantom tile of class ``label`` (name or index into CLASSES) as uint8 size x size x 3."""
    name = CLASSES[label] if isinstance(label, (int, np.integer)) else str(label).upper()
    if name not in _RECIPES:
        raise ValueError(f"unknown tissue class {label!r}; expected one of {', '.join(CLASSES)}")
    if size < 8:
        raise ValueError(f"tile size must be at least 8, got {size}")
    zoom = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))  # scale jitter
    p = Painter(size, rng, zoom)
    _RECIPES[name](p)
    if rng.random() < BORDER_PROB:
        other = Painter(size, rng, zoom)
        _RECIPES[str(rng.choice(NEIGHBOURS[name]))](other)
        patch = p.region(rng.uniform(60, 150), rng.uniform(0.15, 0.45))
        for attr in ("h", "e", "blood", "neutral"):
            setattr(p, attr, getattr(p, attr) * (1 - patch) + getattr(other, attr) * patch)
    # slide-to-slide variation within a site: section thickness and staining time
    h = np.clip(p.h, 0, None) * rng.uniform(0.85, 1.15)
    e = np.clip(p.e, 0, None) * rng.uniform(0.85, 1.15) * (0.8 + 0.4 * p.grain)  # fine tissue texture
    e = e + 0.25 * h  # nuclei take some eosin too, which makes them purple rather than blue
    rgb = render(h, e, style, blood=p.blood, neutral=p.neutral)
    sigma = (style.blur + rng.uniform(0.0, 0.8)) * p.u
    rgb = p.blur(rgb, sigma)
    rgb = rgb + rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(style.noise)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def write_phantom_site(
    out: str | Path,
    per_class: int,
    size: int = 64,
    site: int = 0,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    labeled: bool = True,
) -> Path:
    """Write ``per_class`` tiles of each class in site ``site``'s stain style; returns ``out``.

    Labeled: ``out/<CLASS>/<CLASS>_s<site>_<i>.png``; unlabeled: the same names in one flat folder.
    Every tile has its own seed (seed, site, class, i), so adding tiles keeps the earlier ones.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    out = Path(out)
    style = site_style(site)
    for name in classes:
        if name not in CLASSES:
            raise ValueError(f"unknown tissue class {name!r}; expected some of {', '.join(CLASSES)}")
        folder = out / name if labeled else out
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, site, CLASSES.index(name), i])
            tile = generate_tile(name, size, rng, style)
            Image.fromarray(tile).save(folder / f"{name}_s{site}_{i}.png")
    return out
