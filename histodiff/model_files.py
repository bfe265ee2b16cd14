"""Model files: diffusers ``save_pretrained`` folders, safetensors state dicts, the exported global model."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from histodiff.errors import InputError

MODEL_INFO = "model_info.json"


def flat(name: str, module_or_state) -> dict[str, torch.Tensor]:
    """A module (or its state dict) as flat ``name.key`` arrays, detached on the CPU (the federation's layout)."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    return {f"{name}.{k}": v.detach().cpu() for k, v in state.items()}


def part(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """One model's state dict (names without the ``name.`` prefix) from flat arrays."""
    cut = len(name) + 1
    return {k[cut:]: v for k, v in weights.items() if k.startswith(name + ".")}


def load_part(module: torch.nn.Module, weights: dict[str, torch.Tensor], name: str) -> bool:
    """Load the ``name.*`` flat arrays into ``module`` (strict); False when there are none."""
    own = part(weights, name)
    if own:
        module.load_state_dict(own, strict=True)
    return bool(own)


def save_state_dict_file(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def save_pretrained_atomic(model, directory: Path) -> None:
    """``model.save_pretrained`` into a temporary folder, then swap it in (no half-written checkpoint)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _swap_in(tmp, directory)


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace ``directory`` by the finished folder ``tmp`` (the old one is moved aside first, then removed)."""
    import shutil

    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        directory.replace(old)
        tmp.replace(directory)
        shutil.rmtree(old)
    else:
        tmp.replace(directory)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextmanager
def no_weight_init():
    """Build modules without drawing their random initial weights (``torch.nn.init`` does nothing inside), for
    modules whose every parameter is loaded right after (strict ``load_state_dict``): a paper-size UNet's random
    initialisation costs many seconds of CPU per message. Parameters hold uninitialised memory until loaded."""
    import torch.nn.init as init

    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def save_pretrained_state(model, state: dict[str, torch.Tensor], directory: Path) -> None:
    """What ``save_pretrained_atomic(model)`` writes for a diffusers model holding ``state`` (its config.json and
    ``diffusion_pytorch_model.safetensors``), from the flat tensors, without building the model's weights: ``model``
    only gives the config and may live on the ``meta`` device. Written to a temporary folder, then swapped in."""
    import shutil

    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_config(str(tmp))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / SAFETENSORS_WEIGHTS_NAME),
              metadata={"format": "pt"})
    _swap_in(tmp, directory)


def export_global_weights(out: Path, cfg, weights: dict[str, torch.Tensor], scale_factor: float) -> Path:
    """``export_global_model`` from the flat ``autoencoder.*`` / ``unet.*`` arrays, without building the models'
    weights (the same files: diffusers layout, scheduler, ``model_info.json``)."""
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.noise_schedule import build_noise_scheduler
    from histodiff.diffusion.unet import build_unet

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        autoencoder, unet = build_autoencoder(cfg.lae), build_unet(cfg)
    autoencoder.register_to_config(scaling_factor=float(scale_factor))
    save_pretrained_state(autoencoder, part(weights, "autoencoder"), out / "autoencoder")
    save_pretrained_state(unet, part(weights, "unet"), out / "unet")
    build_noise_scheduler(cfg.dm).save_pretrained(str(out / "scheduler"))
    (out / MODEL_INFO).write_text(json.dumps(_model_info(cfg, scale_factor), indent=2))
    return out


def _model_info(cfg, scale_factor: float) -> dict:
    return {
        "profile": cfg.profile,
        "image_size": cfg.tiles.image_size,
        "latent_channels": cfg.lae.latent_channels,
        "scale_factor": float(scale_factor),
    }


def export_global_model(out: Path, cfg, autoencoder, unet, scale_factor: float) -> Path:
    """Write a self-contained model folder: autoencoder/, unet/, scheduler/ and model_info.json.

    The autoencoder's ``scaling_factor`` is set to the global scale factor, so diffusers users get a
    consistent pipeline without this project.
    """
    from histodiff.diffusion.noise_schedule import build_noise_scheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    autoencoder.register_to_config(scaling_factor=float(scale_factor))
    save_pretrained_atomic(autoencoder, out / "autoencoder")
    save_pretrained_atomic(unet, out / "unet")
    build_noise_scheduler(cfg.dm).save_pretrained(str(out / "scheduler"))
    (out / MODEL_INFO).write_text(json.dumps(_model_info(cfg, scale_factor), indent=2))
    return out


def load_global_model(directory: str | Path, cfg=None):
    """Load (autoencoder, unet, info) from an exported model folder; check it matches ``cfg``'s profile."""
    from diffusers import AutoencoderKL, UNet2DModel

    directory = Path(directory)
    info_path = directory / MODEL_INFO
    if not info_path.is_file():
        raise InputError(f"{directory} is not a HistoDiffusion model folder (no {MODEL_INFO})")
    try:
        info = json.loads(info_path.read_text())
        info.get("profile")
    except (ValueError, AttributeError) as exc:
        raise InputError(f"{info_path} is not a JSON object of model info ({str(exc).splitlines()[0]})") from exc
    if cfg is not None and (info.get("profile") != cfg.profile or info.get("image_size") != cfg.tiles.image_size):
        raise InputError(
            f"model {directory} was trained with profile {info.get('profile')} at {info.get('image_size')} px; "
            f"this run uses profile {cfg.profile} at {cfg.tiles.image_size} px"
        )
    models = []
    for cls, name in ((AutoencoderKL, "autoencoder"), (UNet2DModel, "unet")):
        try:
            models.append(cls.from_pretrained(str(directory / name)).eval())
        except Exception as exc:  # noqa: BLE001 - missing, truncated or foreign files: name the folder, one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"cannot load {directory / name} ({type(exc).__name__}: {first})") from exc
    return models[0], models[1], info
