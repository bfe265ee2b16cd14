"""Candidate synthetic tiles: classifier-guided DDIM per class, decoded with the fine-tuned decoder D'."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from PIL import Image

from histodiff.data import to_uint8_image
from histodiff.guidance.classifier_guidance import sample_classes
from histodiff.diffusion.ddim_sampling import decode_latents

log = logging.getLogger("histodiff.augment")


def candidate_counts(real_counts: dict[int, int], ratios: list[float], factor: float) -> dict[int, int]:
    """Candidates per class: ``factor`` x the largest quota any table row asks for (at least 1)."""
    top = max(ratios) if ratios else 0.0
    return {c: max(1, math.ceil(factor * top * n)) for c, n in real_counts.items()}


def generate_candidates(cfg, unet, scheduler, latent_classifier, autoencoder, scale_factor: float,
                        counts: dict[int, int], classes: list[str], out: Path) -> list[dict]:
    """Write ``out/<CLASS>/<CLASS>_<n>.png`` for every candidate; returns one record per tile."""
    labels = [c for c in sorted(counts) for _ in range(counts[c])]
    # a tile's seed is fixed by the run seed and its position: the same config regenerates the same tiles
    seeds = [cfg.seed * 1_000_003 + i for i in range(len(labels))]
    dm, a = cfg.dm, cfg.augment
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(1e-9, time.perf_counter() - started)
        log.info("guided sampling: %d/%d candidates (%.2f tiles/s, g=%.2f, %d DDIM steps, eta %.2f)", done, total,
                 rate, dm.guidance_scale, dm.ddim_steps, dm.eta)

    # sample, decode and write one batch at a time: nothing of the whole candidate set is held in memory, and the
    # tiles written so far stay on disk if the stage is interrupted
    bs = a.sample_batch_size
    records, per_class = [], {c: 0 for c in counts}
    for start in range(0, len(labels), bs):
        batch_labels, batch_seeds = labels[start:start + bs], seeds[start:start + bs]
        z = sample_classes(unet, scheduler, latent_classifier, scheduler.alphas_cumprod, batch_labels, batch_seeds,
                           dm.ddim_steps, dm.guidance_scale, dm.eta, bs)
        images = decode_latents(autoencoder, z, scale_factor, batch_size=bs).cpu()
        for img, c, seed in zip(images, batch_labels, batch_seeds):
            name = classes[c]
            rel = f"{name}/{name}_{per_class[c]:05d}.png"
            per_class[c] += 1
            (out / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8_image(img)).save(out / rel)
            records.append({"path": rel, "class": name, "label": c, "seed": seed,
                            "guidance_scale": float(dm.guidance_scale), "ddim_steps": int(dm.ddim_steps),
                            "eta": float(dm.eta)})
        progress(start + len(batch_labels), len(labels))
    return records
