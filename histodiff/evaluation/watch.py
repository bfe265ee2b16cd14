"""Learning you can watch: labelled image grids and FID/KID on a small fixed set while the LAE and the DM train.

``WatchCallback`` is a Lightning callback for ``train_lae_steps`` / ``train_dm_steps``. Every ``train.watch_every``
steps (single site) or after the local steps of a federated round it

- draws a PNG whose rows are labelled in the image: LAE ``real`` / ``reconstructed`` (the same fixed tiles every
  time), DM ``real`` / ``synthetic`` (DDIM with the EMA UNet when the module keeps one, ``train.watch_ddim_steps``
  steps from a fixed generator seed, decoded); named by step (and round);
- computes FID and KID between the fixed real tiles and their reconstructions (LAE) or as many samples (DM) with
  the project's offline FID InceptionV3 (``histodiff.evaluation.fid``), plus PSNR for reconstructions;
- logs the numbers to the Lightning loggers (CSV / TensorBoard, at the global step) and the image to TensorBoard
  (``experiment.add_image``) when a TensorBoard logger is present; appends them to ``<out>/metrics.csv``.

The fixed set: ``train.watch_tiles`` tiles, the first of a permutation seeded by ``seed``, taken from
``train.watch_data`` when given, else held out of the site's own training tiles (``watch_split``), so that the
reconstructions and the FID reference are tiles the model never trained on. FID on 32 tiles is strongly biased
(it only compares steps of one run); KID is unbiased at small sizes.

``labelled_grid`` (rows of tiles with their label drawn on a left margin) also draws the labeled site's
``grids/<CLASS>.png`` (``histodiff.evaluation.table1.class_grid``).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import logging
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch

log = logging.getLogger("histodiff.watch")

WATCH_DIR = "watch"
FIELDS = ("phase", "round", "step", "fid", "kid", "kid_std", "psnr", "n", "seconds", "cpu_seconds")


# ------------------------------------------------------------------ labelled grids


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x 3 x S x S in [-1, 1] -> B x S x S x 3 uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def labelled_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path | None = None, title: str | None = None,
                  ncol: int | None = None, pad: int = 2):
    """One row of tiles per ``(label, images)`` with ``label`` written on a white margin left of the row.

    ``images``: B x 3 x S x S in [-1, 1] (fewer than ``ncol`` leave blank cells). The text is sized to the tile
    (about a third of it, at least 10 px) so that it stays readable at 32-64 px tiles. Returns the PIL image
    (RGB) and saves it to ``path`` when given.
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("labelled_grid needs at least one row")
    sizes = {int(x.shape[-1]) for _, x in rows if len(x)}
    size = max(sizes) if sizes else 32
    ncol = ncol or max(1, max(len(x) for _, x in rows))
    font = _font(max(11, min(16, size // 3)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textbbox((0, 0), label, font=font)[2] for label, _ in rows)
    margin = text_w + 3 * pad + 2
    title_h = 0
    if title:
        box = probe.textbbox((0, 0), title, font=font)
        title_h = box[3] + 2 * pad
    width = margin + ncol * (size + pad) + pad
    height = title_h + len(rows) * (size + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        top = title_h + pad + r * (size + pad)
        box = draw.textbbox((0, 0), label, font=font)
        draw.text((pad + 1, top + (size - (box[3] - box[1])) // 2 - box[1]), label, fill="black", font=font)
        for c, tile in enumerate(_to_uint8(images[:ncol]) if len(images) else []):
            img = Image.fromarray(tile)
            if img.size != (size, size):
                img = img.resize((size, size), Image.NEAREST)
            canvas.paste(img, (margin + c * (size + pad), top))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
    return canvas


# ------------------------------------------------------------------ the fixed set


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()


def _plain_view(dataset, positions: list[int]):
    """The tiles at ``positions`` of ``dataset`` without random flips (a TileFolder) or as they come."""
    from histodiff.data.tile_dataset import TileFolder

    if isinstance(dataset, TileFolder):
        return TileFolder(dataset.index, replace(dataset.options, augment=False),
                          [dataset.positions[i] for i in positions])
    return torch.utils.data.Subset(dataset, positions)


def _training_view(dataset, positions: list[int]):
    from histodiff.data.tile_dataset import TileFolder

    if isinstance(dataset, TileFolder):
        return TileFolder(dataset.index, dataset.options, [dataset.positions[i] for i in sorted(positions)])
    return torch.utils.data.Subset(dataset, sorted(positions))


def watch_split(cfg, dataset):
    """(training tiles, watch tiles as an N x 3 x S x S tensor) for a site whose training set is ``dataset``.

    With ``train.watch_data`` the watch tiles come from that folder and ``dataset`` is returned whole; else the
    first ``train.watch_tiles`` of a permutation seeded by ``cfg.seed`` are held out of training (at most a
    quarter of the site's tiles, so that training keeps most of them). The same tiles every call.
    """
    want = int(cfg.train.watch_tiles)
    if cfg.train.watch_data:
        from histodiff.data.tile_dataset import TileFolder, TileOptions

        options = TileOptions(cfg.tiles.image_size, augment=False, max_image_pixels=cfg.tiles.max_image_pixels)
        source = TileFolder.open(cfg.train.watch_data, options, work_dir=cfg.work_dir or cfg.run_dir,
                                 report_name="watch_tile_report.json")
        if len(source) < 2:
            raise ValueError(f"train.watch_data={cfg.train.watch_data} holds {len(source)} tile(s); watching needs 2")
        order = _permutation(len(source), cfg.seed)[:want]
        return dataset, tiles_of(_plain_view(source, order))
    n = len(dataset)
    held = min(want, n // 4)
    if held < 2:
        raise ValueError(f"train.watch_every is on but the site has {n} tiles: at least 8 are needed to hold 2 out "
                         "for watching (or set train.watch_data to a folder of held-out tiles)")
    if held < want:
        log.warning("watching on %d held-out tiles instead of train.watch_tiles=%d (a quarter of the site's %d)",
                    held, want, n)
    order = _permutation(n, cfg.seed)
    return _training_view(dataset, order[held:]), tiles_of(_plain_view(dataset, order[:held]))


def tiles_of(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


# ------------------------------------------------------------------ metrics


def kid_small(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, subsets: int = 50) -> tuple[float, float]:
    """KID (mean, std) with subsets of half the smaller set (a subset of all tiles would be the same every draw)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    from histodiff.evaluation.fid import _Precomputed

    size = max(2, min(len(real), len(fake)) // 2)
    with warnings.catch_warnings():  # its memory warning is moot: the features are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=size, subsets=subsets)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng():  # its subset draws use the global RNG: leave training's untouched
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def psnr(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean PSNR (dB) over tiles, on [0, 1] pixels."""
    mse = (((real.float() - fake.float()) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _batches(x: torch.Tensor, size: int = 32):
    return list(x.split(size))


# ------------------------------------------------------------------ the callback


class WatchCallback(L.Callback):
    """Watch the LAE (``phase="lae"``) or the DM (``phase="dm"``) every ``every`` steps and/or at the end.

    ``tiles``: the fixed real tiles (N x 3 x S x S); ``out``: where the PNGs and ``metrics.csv`` go;
    ``round_steps``: in a federated round, its local steps (files are named ``round-R-step-S``; R is the site's
    step over the round length); ``grid``: tiles per row in the PNG. ``self.history`` holds every watch's numbers,
    ``self.last`` the latest.
    """

    def __init__(self, cfg, phase: str, tiles: torch.Tensor, out: str | Path, every: int = 0, at_end: bool = True,
                 round_steps: int | None = None, grid: int | None = None):
        if phase not in ("lae", "dm"):
            raise ValueError(f"phase {phase!r}: expected 'lae' or 'dm'")
        if len(tiles) < 2:
            raise ValueError("watching needs at least 2 fixed tiles (FID and KID are undefined below that)")
        self.cfg, self.phase, self.tiles = cfg, phase, tiles.detach().cpu()
        self.out, self.every, self.at_end = Path(out), int(every), bool(at_end)
        self.round_steps = round_steps
        self.grid = int(grid or cfg.train.watch_grid)
        self.history: list[dict] = []
        self.last: dict = {}
        self._start = 0
        self._step = 0
        self._inception = None
        self._real_features: torch.Tensor | None = None

    # -- Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._step = int(pl_module.step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # callbacks run before the module's own hook: count batches instead of reading pl_module.step
        self._step = self._start + batch_idx + 1
        if self.every > 0 and self._step % self.every == 0:
            self.watch(trainer, pl_module, self._step)

    def on_train_end(self, trainer, pl_module) -> None:
        step = int(pl_module.step)
        if self.at_end and (not self.history or self.history[-1]["step"] != step):
            self.watch(trainer, pl_module, step)

    # -- the work
    def _features(self, images: torch.Tensor, device) -> torch.Tensor:
        from histodiff.evaluation.fid import inception_features
        from histodiff.evaluation.inception import load_inception

        if self._inception is None:
            self._inception = load_inception(self.cfg.weights)
        return inception_features(self._inception, _batches(images), device)

    def _real(self, device) -> torch.Tensor:
        """The fixed tiles' features, computed once (and cached in ``out``, keyed by the tiles' digest)."""
        if self._real_features is None:
            digest = hashlib.sha256(self.tiles.numpy().tobytes()).hexdigest()[:16]
            cache = self.out / f"real-features-{self.cfg.weights.inception}-{digest}.pt"
            if cache.is_file():
                self._real_features = torch.load(cache, map_location="cpu", weights_only=True)
            else:
                self._real_features = self._features(self.tiles, device)
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self._real_features, cache)
        return self._real_features

    @torch.no_grad()
    def _reconstruct(self, pl_module, device) -> torch.Tensor:
        ae = pl_module.autoencoder
        was = ae.training
        ae.eval()
        try:
            out = [ae.decode(ae.encode(x.to(device)).latent_dist.mode()).sample.clamp(-1, 1).float().cpu()
                   for x in _batches(self.tiles, int(self.cfg.tiles.batch_size))]
        finally:
            ae.train(was)
        return torch.cat(out)

    @torch.no_grad()
    def _sample(self, pl_module, device) -> tuple[torch.Tensor, str]:
        from histodiff.diffusion.ddim_sampling import ddim_sample, decode_latents
        from histodiff.diffusion.noise_schedule import build_ddim

        unet = copy.deepcopy(pl_module.unet).eval()
        which = "EMA"
        if getattr(pl_module, "ema", None) is not None:
            pl_module.ema.copy_to(unet.parameters())
        else:
            which = "site"  # a federated round: the server keeps the EMA of the global model
        gen = torch.Generator(device=device).manual_seed(int(self.cfg.seed))
        n, batch = len(self.tiles), int(self.cfg.augment.sample_batch_size)
        z = torch.cat([ddim_sample(unet, build_ddim(self.cfg.dm), min(batch, n - i), int(self.cfg.train.watch_ddim_steps),
                                   0.0, gen) for i in range(0, n, batch)])
        images = decode_latents(pl_module.autoencoder, z, pl_module.scale_factor).float().cpu()
        del unet
        return images, which

    def watch(self, trainer, pl_module, step: int) -> dict:
        """Write this step's grid and numbers; returns the numbers."""
        if not trainer.is_global_zero:
            return {}
        from histodiff.evaluation.fid import fid

        start, cpu = time.perf_counter(), time.process_time()
        device = pl_module.device
        rnd = None
        if self.round_steps:
            rnd = max(1, math.ceil(step / self.round_steps))
        if self.phase == "lae":
            fake = self._reconstruct(pl_module, device)
            rows = [("real", self.tiles[: self.grid]), ("reconstructed", fake[: self.grid])]
            what = "held-out tiles"
        else:
            fake, which = self._sample(pl_module, device)
            rows = [("real", self.tiles[: self.grid]), ("synthetic", fake[: self.grid])]
            what = f"DDIM {self.cfg.train.watch_ddim_steps} steps, {which} UNet, seed {self.cfg.seed}"
        real_f, fake_f = self._real(device), self._features(fake, device)
        k_mean, k_std = kid_small(real_f, fake_f, seed=int(self.cfg.seed))
        values = {"fid": fid(real_f, fake_f), "kid": k_mean, "kid_std": k_std}
        if self.phase == "lae":
            values["psnr"] = psnr(self.tiles, fake)
        name = f"{self.phase}-step-{step:07d}.png" if rnd is None else f"{self.phase}-round-{rnd:03d}-step-{step:07d}.png"
        where = f"round {rnd}, step {step}" if rnd is not None else f"step {step}"
        image = labelled_grid(rows, self.out / name, title=f"{self.phase.upper()} {where}: {what}")
        seconds = time.perf_counter() - start
        line = {"phase": self.phase, "round": rnd, "step": step, **values, "n": len(self.tiles), "seconds": seconds,
                "cpu_seconds": time.process_time() - cpu}
        self._append_csv(line)
        self._to_loggers(trainer, values, image, step)
        self.history.append(line)
        self.last = line
        log.info("watch %s %s: FID %.1f, KID %.4f +- %.4f%s (%d tiles, %.1f s) -> %s", self.phase, where,
                 values["fid"], k_mean, k_std, f", PSNR {values['psnr']:.2f} dB" if "psnr" in values else "",
                 len(self.tiles), seconds, self.out / name)
        return line

    def _append_csv(self, line: dict) -> None:
        path = self.out / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if line.get(k) is None else line.get(k)) for k in FIELDS})

    def _to_loggers(self, trainer, values: dict, image, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            logger.log_metrics({f"watch/{self.phase}_{k}": float(v) for k, v in values.items()}, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"watch/{self.phase}", np.asarray(image), step, dataformats="HWC")
            logger.save()

    def figures(self) -> dict[str, float]:
        """The latest numbers as metrics a federated reply may carry (``watch-<phase>-fid`` ...): figures only."""
        return {f"watch-{self.phase}-{k.replace('_', '-')}": float(self.last[k])
                for k in ("fid", "kid", "kid_std", "psnr") if self.last.get(k) is not None}


def watch_callback(cfg, phase: str, dataset, out: str | Path, round_steps: int | None = None):
    """(training dataset, WatchCallback) when ``train.watch_every`` > 0, else (``dataset``, None).

    Single site: every ``train.watch_every`` steps and at the end; federated (``round_steps`` given): at the end of
    the round's local steps.
    """
    if int(cfg.train.watch_every) <= 0:
        return dataset, None
    train, tiles = watch_split(cfg, dataset)
    every = 0 if round_steps else int(cfg.train.watch_every)
    return train, WatchCallback(cfg, phase, tiles, out, every=every, at_end=True, round_steps=round_steps)
