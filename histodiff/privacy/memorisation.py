"""Memorisation checked where the data lives: samples of the global generator against a site's own tiles.

A site draws ``samples`` unguided DDIM samples from the global model (UNet, LAE decoder, latent scale factor, a fixed
seed) and finds, for each, its nearest and second-nearest own tile in two spaces: the LAE encoder's latent means
(``feature``) and pixels in [0, 1] at ``PIXEL_SIDE`` px (``pixel``, RMS). A sample is a near-copy when
d(nn1) < alpha * d(nn2): the relative distance of Carlini et al. 2023 ("Extracting Training Data from Diffusion
Models"), with the second-nearest tile as the reference distance. Only ``FIGURES`` (counts and quantiles) leave
the site; per-sample details stay in its own folder (``write_local_report``).

Distances are taken to a tile's whole dihedral orbit (the 8 flips and rotations the DM was trained on, see
``TileOptions.augment``), so a copy in another orientation counts; tiles identical at ``PIXEL_SIDE`` px count once,
else a copied tile that a site holds twice would hide behind its duplicate (d(nn1) = d(nn2)).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from histodiff.diffusion.ddim_sampling import ddim_loop, decode_latents
from histodiff.privacy import MEMORISATION_MAX_SAMPLES as MAX_SAMPLES

PIXEL_SIDE = 32  # near-copies survive downsampling; 3 KB per tile keeps a site's pass cheap
SPACES = ("feature", "pixel")
QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}  # fixed here, not by the server: it cannot ask for min or max
COUNTS = ("samples", "tiles", "near-copies-feature", "near-copies-pixel", "near-copies")
QUANTILE_FIGURES = tuple(f"{space}-{what}-{q}" for space in SPACES for what in ("nn", "ratio") for q in QUANTILES)
FIGURES = COUNTS + QUANTILE_FIGURES  # everything a site's reply may carry (plus its seconds)
LOCAL_REPORT = "memorisation"  # <site state>/memorisation/: report.json and near_copies.png, never sent


@dataclass
class NearestTwo:
    """Per query row: distance and reference index of its nearest and second-nearest reference, fed in batches."""

    dist: torch.Tensor  # queries x 2, ascending
    index: torch.Tensor  # queries x 2 (-1: none yet)

    @classmethod
    def empty(cls, queries: int) -> "NearestTwo":
        return cls(torch.full((queries, 2), math.inf, dtype=torch.float64), torch.full((queries, 2), -1))

    def add(self, dist: torch.Tensor, offset: int) -> None:
        """``dist``: queries x batch distances to references ``offset .. offset + batch - 1``."""
        ids = torch.arange(offset, offset + dist.shape[1]).expand(dist.shape[0], -1)
        both = torch.cat([self.dist, dist.double()], dim=1)
        best = both.topk(2, dim=1, largest=False, sorted=True)
        self.dist = best.values
        self.index = torch.cat([self.index, ids], dim=1).gather(1, best.indices)


@dataclass
class MemorisationResult:
    figures: dict[str, float]  # what may leave the site
    nearest: dict[str, NearestTwo]  # per space, for the site's own report only
    near_copy: dict[str, torch.Tensor]  # per space: bool per sample
    images: torch.Tensor = field(repr=False)  # the decoded samples in [-1, 1]


def dihedral(x: torch.Tensor) -> torch.Tensor:
    """The 8 flips/rotations of a batch, stacked view-major: (8 * N) x C x H x W."""
    turns = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return torch.cat(turns + [torch.flip(t, dims=(3,)) for t in turns])


def small_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 at ``PIXEL_SIDE`` px (antialiased), the pixel space of the check."""
    if x.shape[-1] != PIXEL_SIDE:
        x = F.interpolate(x.float(), size=(PIXEL_SIDE, PIXEL_SIDE), mode="bilinear", antialias=True,
                          align_corners=False)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _pixel_vectors(pix: torch.Tensor) -> torch.Tensor:
    return pix.flatten(1).double() / 255.0


@torch.no_grad()
def latent_means(autoencoder, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """The feature space: the LAE encoder's posterior means, flattened (what the DM models, before scaling)."""
    out = [autoencoder.encode(chunk.to(device)).latent_dist.mean.flatten(1).double().cpu()
           for chunk in x.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def sample_images(unet, scheduler, autoencoder, scale_factor: float, samples: int, ddim_steps: int, seed: int,
                  batch_size: int, device) -> torch.Tensor:
    """Unguided DDIM (eta 0) from z_T drawn on the CPU with ``seed``: the same samples on every site and device."""
    c = unet.config
    z = torch.randn((samples, c.in_channels, c.sample_size, c.sample_size), generator=torch.Generator().manual_seed(seed))
    latents = torch.cat([ddim_loop(unet, scheduler, chunk.to(device), ddim_steps) for chunk in z.split(batch_size)])
    return decode_latents(autoencoder, latents, scale_factor, batch_size).cpu()


def _orbit_distance(queries: torch.Tensor, refs: torch.Tensor, views: int = 8) -> torch.Tensor:
    """samples x refs: L2 distance from each sample's nearest view (of ``views`` stacked view-major) to each ref."""
    d = torch.cdist(queries, refs)
    return d.view(views, -1, refs.shape[0]).min(dim=0).values


def summarise(nearest: dict[str, NearestTwo], alpha: float, tiles: int) -> tuple[dict[str, float], dict]:
    """(the figures a site may send, the near-copy mask per space)."""
    figures: dict[str, float] = {"samples": int(next(iter(nearest.values())).dist.shape[0]), "tiles": int(tiles)}
    masks = {}
    for space, nn in nearest.items():
        d1, d2 = nn.dist[:, 0], nn.dist[:, 1]
        # d2 == 0 means two distinct tiles equally close (d1 == 0 too): not distinguishable, no evidence of a copy
        ratio = torch.where(d2 > 0, d1 / d2.clamp_min(1e-300), torch.ones_like(d1))
        masks[space] = ratio < alpha
        figures[f"near-copies-{space}"] = int(masks[space].sum())
        for name, q in QUANTILES.items():
            figures[f"{space}-nn-{name}"] = float(torch.quantile(d1, q))
            figures[f"{space}-ratio-{name}"] = float(torch.quantile(ratio, q))
    figures["near-copies"] = int((masks["feature"] | masks["pixel"]).sum())
    return {k: figures[k] for k in FIGURES}, masks


@torch.no_grad()
def check_memorisation(unet, scheduler, autoencoder, scale_factor: float, tiles, samples: int, ddim_steps: int,
                       alpha: float, seed: int, batch_size: int = 16, device: str | torch.device = "cpu",
                       sample_batch_size: int | None = None) -> MemorisationResult:
    """Sample the global model and compare the samples with every tile of ``tiles`` (a dataset of (image, label)
    without augmentation), streaming: memory is O(samples), whatever the number of tiles. ``batch_size``: tiles per
    encoder pass; ``sample_batch_size`` (default ``batch_size``): samples per DDIM batch."""
    if not 1 <= samples <= MAX_SAMPLES or ddim_steps < 1 or not 0 < alpha <= 1:
        raise ValueError(f"memorisation check: samples {samples} (1..{MAX_SAMPLES}), ddim steps {ddim_steps} (>= 1) "
                         f"and alpha {alpha} (0 < alpha <= 1) out of range")
    unet, autoencoder = unet.eval().to(device), autoencoder.eval().to(device)
    images = sample_images(unet, scheduler, autoencoder, scale_factor, samples, ddim_steps, seed,
                           sample_batch_size or batch_size, device)
    views = dihedral(images)
    queries = {"feature": latent_means(autoencoder, views, batch_size, device),
               "pixel": _pixel_vectors(small_pixels(views))}
    nearest = {space: NearestTwo.empty(samples) for space in SPACES}
    pixel_norm = math.sqrt(queries["pixel"].shape[1])  # L2 -> RMS over pixel values
    seen: set[bytes] = set()
    positions: list[int] = []  # dataset position of each distinct tile, in the order they were compared
    for batch, (x, _) in enumerate(_batches(tiles, batch_size)):
        pix = small_pixels(x)
        keep = [i for i in range(len(x)) if _first_time(pix[i], seen)]
        if not keep:
            continue
        x, pix = x[keep], pix[keep]
        for space, refs in (("feature", latent_means(autoencoder, x, batch_size, device)),
                            ("pixel", _pixel_vectors(pix))):
            d = _orbit_distance(queries[space], refs)
            nearest[space].add(d / pixel_norm if space == "pixel" else d, len(positions))
        positions += [batch * batch_size + i for i in keep]
    count = len(positions)
    if count < 2:
        raise ValueError(f"memorisation check needs at least 2 distinct tiles at the site, it has {count}")
    lookup = torch.tensor(positions)
    for nn in nearest.values():
        nn.index = lookup[nn.index]
    figures, masks = summarise(nearest, alpha, count)
    return MemorisationResult(figures, nearest, masks, images)


def _batches(tiles, batch_size: int):
    return DataLoader(tiles, batch_size=batch_size, shuffle=False)


def _first_time(pix: torch.Tensor, seen: set[bytes]) -> bool:
    digest = hashlib.blake2b(pix.numpy().tobytes(), digest_size=16).digest()
    if digest in seen:
        return False
    seen.add(digest)
    return True


def write_local_report(result: MemorisationResult, out_dir: Path, tile_name=str, tile_image=None,
                       pairs: int = 16) -> Path:
    """The site's own record (never sent): per sample, its two nearest tiles (``tile_name(position)``) and distances
    in both spaces; with ``tile_image(position)`` (a tile in [-1, 1]), ``near_copies.png``: each near-copy beside its
    nearest tile, for a person at the site to look at."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, shown = [], []
    for i in range(len(result.images)):
        row = {"sample": i}
        for space, nn in result.nearest.items():
            row[space] = {"nn1": tile_name(int(nn.index[i, 0])), "nn2": tile_name(int(nn.index[i, 1])),
                          "d1": float(nn.dist[i, 0]), "d2": float(nn.dist[i, 1]),
                          "near_copy": bool(result.near_copy[space][i])}
        flagged = [space for space in SPACES if row[space]["near_copy"]]
        if flagged and len(shown) < pairs:
            shown.append((i, int(result.nearest[flagged[-1]].index[i, 0])))
        rows.append(row)
    path = out_dir / "report.json"
    path.write_text(json.dumps({"figures": result.figures, "samples": rows}, indent=2))
    grid = out_dir / "near_copies.png"
    grid.unlink(missing_ok=True)  # a grid of an earlier check must not outlive it
    if shown and tile_image is not None:
        from histodiff.diffusion.ddim_sampling import save_grid

        save_grid(torch.stack([t for i, pos in shown for t in (result.images[i], tile_image(pos))]), grid, nrow=2)
    return path
