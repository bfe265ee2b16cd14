"""Round checkpoints in the run directory: global weights in diffusers layout, strategy state, metrics.jsonl.

``checkpoints/round-NNNN/`` is written completely before ``server_state.json`` points at it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from wire.contract import part

METRICS_FILE = "metrics.jsonl"
KEEP = 2  # round checkpoints kept (the committed one and the one before)


def save_round(run_dir: Path, name: str, cfg, weights: dict[str, torch.Tensor],
               strategy_state: dict[str, torch.Tensor]) -> str:
    """Write the global weights and strategy state of one round; returns the folder relative to ``run_dir``."""
    from safetensors.torch import save_file

    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.unet import build_unet
    from histodiff.model_files import save_pretrained_state, save_state_dict_file

    rel = f"checkpoints/{name}"
    out = Path(run_dir) / rel
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # diffusers layout written straight from the flat tensors: the models are built on the meta device for their
    # config only (building a paper-size UNet's weights and copying them in cost more than writing them)
    ae = part(weights, "autoencoder")
    if ae:
        with torch.device("meta"):
            model = build_autoencoder(cfg.lae)
        _check_names(model, ae, "autoencoder")
        save_pretrained_state(model, ae, out / "autoencoder")
    disc = part(weights, "discriminator")
    if disc:
        save_state_dict_file(disc, out / "discriminator.safetensors")
    unet = part(weights, "unet")
    if unet:
        with torch.device("meta"):
            model = build_unet(cfg)
        _check_names(model, unet, "unet")
        save_pretrained_state(model, unet, out / "unet")
    save_file({k: v.contiguous() for k, v in strategy_state.items()}, str(out / "strategy.safetensors"))
    return rel


def _check_names(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """The flat arrays are exactly the model's state dict (names and shapes), as a strict load would check."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if own != got:
        bad = sorted(set(own) ^ set(got)) or [k for k in own if own[k] != got[k]]
        raise ValueError(f"{name} arrays do not fit the model: {bad[:3]}")


def load_round(run_dir: Path, rel: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from diffusers import AutoencoderKL, UNet2DModel
    from safetensors.torch import load_file

    folder = Path(run_dir) / rel
    weights: dict[str, torch.Tensor] = {}
    if (folder / "autoencoder").is_dir():
        sd = AutoencoderKL.from_pretrained(str(folder / "autoencoder")).state_dict()
        weights.update({f"autoencoder.{k}": v for k, v in sd.items()})
    if (folder / "discriminator.safetensors").is_file():
        weights.update({f"discriminator.{k}": v for k, v in load_file(str(folder / "discriminator.safetensors")).items()})
    if (folder / "unet").is_dir():
        sd = UNet2DModel.from_pretrained(str(folder / "unet")).state_dict()
        weights.update({f"unet.{k}": v for k, v in sd.items()})
    strategy = load_file(str(folder / "strategy.safetensors"))
    return weights, strategy


def prune(run_dir: Path, keep_rel: str) -> None:
    """Remove old round folders, keeping the committed one and the one before it."""
    folders = sorted((Path(run_dir) / "checkpoints").glob("round-*"))
    for folder in folders[:-KEEP]:
        if f"checkpoints/{folder.name}" != keep_rel:
            shutil.rmtree(folder, ignore_errors=True)


def append_metrics(run_dir: Path, line: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def export_model(run_dir: Path, cfg, weights: dict[str, torch.Tensor], scale_factor: float) -> Path:
    """The deliverable: ``run_dir/global_model`` (autoencoder/, unet/, scheduler/, model_info.json)."""
    from histodiff.model_files import export_global_weights

    return export_global_weights(Path(run_dir) / "global_model", cfg, weights, scale_factor)
