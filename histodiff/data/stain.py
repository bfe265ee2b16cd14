"""Per-site H&E stain styles and Beer-Lambert rendering of stain concentration maps to RGB.

Light through a stained section falls as I = I0 * 10^(-sum_s c_s * v_s), v_s a stain's optical-density
(OD) vector; sites differ in their stain vectors, uptake, lamp colour, focus and sensor noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# between Ruifrok & Johnston's (2001) vectors and the usual Macenko normalisation reference
H_REFERENCE = (0.606, 0.712, 0.346)
E_REFERENCE = (0.144, 0.896, 0.331)
# red cells take eosin on top of haemoglobin's own absorption: green and blue absorbed, red passes
BLOOD_REFERENCE = (0.08, 0.74, 0.67)
NEUTRAL = (0.577, 0.577, 0.577)  # dust, pen marks, out-of-focus grey: absorbs all colours alike


@dataclass(frozen=True)
class StainStyle:
    site: int
    h_vec: tuple[float, float, float]  # unit OD vector of haematoxylin (nuclei, blue-purple)
    e_vec: tuple[float, float, float]  # unit OD vector of eosin (cytoplasm, fibres, pink)
    blood_vec: tuple[float, float, float]
    h_gain: float  # how strongly this lab's haematoxylin is taken up
    e_gain: float
    background: tuple[float, float, float]  # I0: the scanner's light through empty glass, 0..255
    blur: float  # scanner focus, Gaussian sigma in reference pixels (0.5 um)
    noise: float  # sensor noise, standard deviation in 8-bit units


def _unit(v: np.ndarray) -> tuple[float, float, float]:
    v = np.abs(v)
    return tuple(float(x) for x in v / np.linalg.norm(v))  # type: ignore[return-value]


def site_style(site: int) -> StainStyle:
    """The stain style of site ``site``: site 0 is the reference, others drift from it (deterministic)."""
    if site < 0:
        raise ValueError(f"site must be >= 0, got {site}")
    if site == 0:
        return StainStyle(0, _unit(np.array(H_REFERENCE)), _unit(np.array(E_REFERENCE)),
                          _unit(np.array(BLOOD_REFERENCE)), 1.0, 1.0, (246.0, 242.0, 248.0), 0.5, 2.0)
    rng = np.random.default_rng([site, 0x5EED])
    # protocols differ in hue (vector direction) and depth (gain) of each stain
    h_vec = _unit(np.array(H_REFERENCE) + rng.normal(0.0, 0.10, 3))
    e_vec = _unit(np.array(E_REFERENCE) + rng.normal(0.0, 0.10, 3) * np.array([1.5, 0.3, 1.5]))
    blood = _unit(np.array(BLOOD_REFERENCE) + rng.normal(0.0, 0.06, 3))
    tint = rng.normal(0.0, 4.0, 3)
    background = tuple(float(x) for x in np.clip(rng.uniform(236.0, 250.0) + tint, 225.0, 255.0))
    return StainStyle(
        site=site,
        h_vec=h_vec,
        e_vec=e_vec,
        blood_vec=blood,
        h_gain=float(rng.uniform(0.7, 1.35)),
        e_gain=float(rng.uniform(0.65, 1.35)),
        background=background,  # type: ignore[arg-type]
        blur=float(rng.uniform(0.2, 1.4)),
        noise=float(rng.uniform(1.0, 4.0)),
    )


def render(
    h: np.ndarray,
    e: np.ndarray,
    style: StainStyle,
    blood: np.ndarray | None = None,
    neutral: np.ndarray | None = None,
) -> np.ndarray:
    """Beer-Lambert: concentration maps (H x W, OD units) -> float RGB H x W x 3 in 0..255."""
    h, e = np.asarray(h, np.float32), np.asarray(e, np.float32)
    od = h[..., None] * (style.h_gain * np.asarray(style.h_vec, np.float32))
    od = od + e[..., None] * (style.e_gain * np.asarray(style.e_vec, np.float32))
    if blood is not None:
        od = od + blood[..., None] * np.asarray(style.blood_vec, np.float32)
    if neutral is not None:
        od = od + neutral[..., None] * np.asarray(NEUTRAL, np.float32)
    return np.asarray(style.background, np.float32) * np.exp(od * np.float32(-np.log(10.0)))  # 10^-od


def rgb_to_od(rgb: np.ndarray, background: float = 255.0) -> np.ndarray:
    """Optical density of uint8 or float RGB (the inverse of ``render`` for a known I0)."""
    return -np.log10(np.clip(np.asarray(rgb, np.float32), 1.0, None) / background)
