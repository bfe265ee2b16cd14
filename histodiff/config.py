"""Typed configuration schema and Hydra composition shared by every entry point.

The YAML files in ``configs/`` fill this schema; the dataclasses give every key a type, so an
unknown key or a value of the wrong type is refused with a one-line message.

Length: about 400 lines, every config key with its type, default and range check, kept in one file so that
a key, its check and the one-line message about it are found together.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

import os

# the repository's configs/; HISTODIFF_CONFIGS points elsewhere (e.g. a site's own profiles)
CONFIG_DIR = Path(os.environ.get("HISTODIFF_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))


@dataclass
class TilesConfig:
    image_size: int = 64
    batch_size: int = 8
    num_workers: int = 0
    max_image_pixels: int = 100_000_000  # larger images are refused as decompression bombs
    random_flip: bool = True


@dataclass
class LAEConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    layers_per_block: int = 2
    latent_channels: int = 3
    norm_num_groups: int = 32
    lr: float = 4.5e-6
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    kl_weight: float = 1.0e-6
    perceptual_weight: float = 1.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    # the discriminator travels with the autoencoder in federated LAE rounds when true
    share_discriminator: bool = True


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [192, 384, 384, 768, 768])
    attention_levels: list[bool] = field(default_factory=lambda: [True, True, True, True, False])
    layers_per_block: int = 2
    num_heads: int = 8  # heads at the first level; diffusers keeps the head width fixed after it
    norm_num_groups: int = 32
    time_scale_shift: str = "scale_shift"
    resblock_updown: bool = True  # down/up-sample with residual blocks (guided-diffusion style)
    dropout: float = 0.0


@dataclass
class DMConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    lr: float = 5.0e-5
    weight_decay: float = 0.01
    warmup_steps: int = 10000
    ema_decay: float = 0.9999
    loss: str = "l2"  # l2 (paper) or l1 (reference release)
    ddim_steps: int = 200
    eta: float = 0.0
    guidance_scale: float = 1.0
    batch_size: Optional[int] = None  # tiles per DM train step; null: tiles.batch_size (the DM wants larger batches)


@dataclass
class LatentClassifierConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [192, 384, 768])
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    layers_per_block: int = 2
    num_heads: int = 8
    norm_num_groups: int = 32
    pool_heads: int = 8
    num_classes: int = 9
    lr: float = 3.0e-4
    steps: int = 20000


@dataclass
class ClassifierConfig:
    """A timm image classifier (auxiliary phi or downstream)."""

    model: str = "resnet18"
    img_size: int = 256
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_path: Optional[str] = None
    lr: float = 1.0e-4
    weight_decay: float = 0.05
    epochs: int = 30


@dataclass
class WeightsConfig:
    perceptual: str = "imagenet"  # imagenet | random (tiny test profile only)
    inception: str = "pretrained"  # pretrained | random (tiny test profile only)
    vgg16_path: Optional[str] = None
    inception_path: Optional[str] = None
    cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500
    accelerator: str = "auto"
    # a site's devices: auto (every GPU, else one CPU process), N, or GPU ids "0,1"; several: one DDP process each,
    # started by the site itself (histodiff/local_training/site_ddp.py), tiles.batch_size split over them
    devices: str = "auto"
    strategy: str = "auto"  # auto | ddp: several devices always train with DDP (the same update as one device)
    precision: str = "auto"  # auto: bf16-mixed on GPUs that support it, else 32-true
    channels_last: bool = True
    grad_clip: float = 0.0
    progress: bool = True
    # learning you can watch (histodiff/evaluation/watch.py): 0 = off; N = every N steps (single site) or, when > 0,
    # after the local steps of every federated round: labelled PNGs (real / reconstructed / synthetic) + FID/KID
    watch_every: int = 0
    watch_tiles: int = 32  # the fixed set: held out of the site's tiles (or from watch_data); FID/KID reference
    watch_grid: int = 8  # tiles per row in the watch PNGs
    watch_ddim_steps: int = 10  # DDIM steps of the watch samples (fixed generator seed = seed)
    watch_data: Optional[str] = None  # a folder of tiles to watch on instead of holding out the site's own


@dataclass
class SampleConfig:
    num_samples: int = 16
    batch_size: int = 16
    nrow: int = 4


@dataclass
class AugmentConfig:
    """The labeled-site pipeline (``python -m client.augment``): decoder fine-tuning, guidance, selection."""

    ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0])  # selective synthetic / real per class
    random_ratios: list[float] = field(default_factory=lambda: [0.5])  # the "random" control rows
    tau: float = 0.5  # minimum baseline-classifier confidence for the target class
    candidates_factor: float = 2.0  # candidates per class = factor x the largest quota
    sample_batch_size: int = 16
    feature_threshold: float = 1.0e-3  # memorisation guard: drop tiles nearer a real tile (feature L2)
    pixel_threshold: float = 0.02  # ... or nearer in pixels (RMS over [0, 1] pixels)
    seeds: list[int] = field(default_factory=lambda: [0])  # downstream seeds; mean +- std when several
    lambda_ce: float = 0.1  # weight of CE(phi(D'(z)), y) in decoder fine-tuning (paper eq. 5)
    decoder_steps: int = 500
    decoder_lr: float = 1.0e-5
    val_fraction: float = 0.2  # validation split carved from the labeled training tiles
    min_val_per_class: int = 1
    latent_eval_timesteps: list[int] = field(default_factory=lambda: [0, 250, 500, 750, 999])
    grid_tiles: int = 8  # real and synthetic tiles per class in grids/<CLASS>.png
    allow_overlap: bool = False  # test tiles that are also training tiles: a warning instead of an error


@dataclass
class PrivacyConfig:
    """Differential privacy of what leaves a site (histodiff/privacy, strategies/privacy_ledger.py, client/site_privacy.py)."""

    dp: bool = False  # DP-SGD at each site (mode=local) or clipped updates + server noise (mode=central)
    mode: str = "local"  # local: opacus DP-SGD at the site | central: Flower client clipping + server noise
    target_epsilon: float = 8.0  # the site's whole budget, all rounds and both phases together
    delta: float = 1.0e-5
    max_grad_norm: float = 1.0  # local: per-sample gradient clip; central: clip of each site's update
    noise_multiplier: Optional[float] = None  # null: derived from target_epsilon over planned_steps
    planned_steps: int = 0  # DP steps this site will take in the whole run (needed when noise_multiplier is null)
    latent_clip: float = 30.0  # DP latent statistics: latent values clipped to [-B, B]
    secagg: bool = False  # SecAgg+ (wire/secagg.py): the server sees only the weighted sum of updates
    secagg_clipping_range: float = 8.0  # each weighted update value (w - g) is clipped to [-c, c], then quantised
    secagg_quantization_range: int = 4194304  # 2**22 levels over [-c, c]; sites x levels must stay below 2**32
    secagg_threshold: float = 0.6  # Shamir threshold t = max(2, ceil(fraction x sites)): survivors needed to unmask
    secagg_stats_range: float = 1000.0  # clipping range of the latent moments (mean, mean of squares) when masked


@dataclass
class Config:
    profile: str = MISSING
    stage: str = "lae"  # lae | dm | sample
    data: Optional[str] = None
    labels: Optional[str] = None
    run_dir: str = "runs/default"
    work_dir: Optional[str] = None  # site work directory (tile index, reports); default run_dir
    seed: int = 0
    tiles: TilesConfig = field(default_factory=TilesConfig)
    lae: LAEConfig = field(default_factory=LAEConfig)
    dm: DMConfig = field(default_factory=DMConfig)
    latent_classifier: LatentClassifierConfig = field(default_factory=LatentClassifierConfig)
    aux_classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    downstream: ClassifierConfig = field(default_factory=ClassifierConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


class ConfigError(ValueError):
    """A configuration that cannot be used; its message is one line."""


_CHOICES = {
    "stage": ("lae", "dm", "sample"),
    "dm.loss": ("l2", "l1"),
    "weights.perceptual": ("imagenet", "random"),
    "weights.inception": ("pretrained", "random"),
    "privacy.mode": ("local", "central"),
}


# numeric ranges: a bad value stops composition with the key named, before any data is read or model built
_POSITIVE = (
    "tiles.image_size", "tiles.batch_size", "tiles.max_image_pixels", "train.steps", "train.log_every",
    "train.ckpt_every", "lae.lr", "lae.layers_per_block", "lae.latent_channels", "lae.norm_num_groups",
    "lae.disc_channels", "dm.num_train_timesteps", "dm.ddim_steps", "dm.lr", "dm.beta_start",
    "dm.unet.layers_per_block", "dm.unet.num_heads", "dm.unet.norm_num_groups", "latent_classifier.lr",
    "latent_classifier.steps", "latent_classifier.layers_per_block", "latent_classifier.num_heads",
    "latent_classifier.norm_num_groups", "latent_classifier.pool_heads", "latent_classifier.num_classes",
    "aux_classifier.lr", "aux_classifier.img_size", "aux_classifier.epochs", "downstream.lr", "downstream.img_size",
    "downstream.epochs", "sample.num_samples", "sample.batch_size", "sample.nrow", "augment.candidates_factor",
    "augment.sample_batch_size", "augment.decoder_lr",
)
_NON_NEGATIVE = (
    "tiles.num_workers", "lae.kl_weight", "lae.perceptual_weight", "lae.disc_start", "lae.disc_weight",
    "lae.disc_factor", "lae.disc_layers", "dm.weight_decay", "dm.warmup_steps", "aux_classifier.weight_decay",
    "downstream.weight_decay", "train.grad_clip", "augment.feature_threshold", "augment.pixel_threshold",
    "augment.lambda_ce", "augment.decoder_steps", "augment.min_val_per_class", "augment.grid_tiles",
)
# (key, low, high, high included): fractions, probabilities, decays
_RANGES = (
    ("dm.ema_decay", 0.0, 1.0, False),
    ("dm.beta_end", 0.0, 1.0, False),
    ("dm.eta", 0.0, 1.0, True),
    ("dm.unet.dropout", 0.0, 1.0, False),
    ("augment.tau", 0.0, 1.0, True),
    ("augment.val_fraction", 0.0, 1.0, False),
)
# channel lists, their GroupNorm group count and (for attention) the head count of the first level
_CHANNELS = (
    ("lae.block_out_channels", "lae.norm_num_groups", None),
    ("dm.unet.block_out_channels", "dm.unet.norm_num_groups", "dm.unet.num_heads"),
    ("latent_classifier.block_out_channels", "latent_classifier.norm_num_groups", "latent_classifier.num_heads"),
)


def _check_ranges(cfg: DictConfig) -> None:
    for key in _POSITIVE:  # written as "not >" so that nan is refused too
        value = OmegaConf.select(cfg, key)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    for key in _NON_NEGATIVE:
        value = OmegaConf.select(cfg, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if cfg.dm.batch_size is not None and not cfg.dm.batch_size > 0:
        raise ConfigError(f"config key 'dm.batch_size' must be positive or null (= tiles.batch_size), got {cfg.dm.batch_size}")
    if cfg.dm.batch_size not in (None, cfg.tiles.batch_size) and cfg.privacy.dp and cfg.privacy.mode == "local":
        raise ConfigError("config key 'dm.batch_size' must be null with DP-SGD (privacy.dp, mode=local): it samples both "
                          "phases at one rate (tiles.batch_size / tiles), which its accountant fixes for the run")
    _check_watch(cfg.train, cfg.dm)
    for key, low, high, closed in _RANGES:
        value = OmegaConf.select(cfg, key)
        if not (low <= value <= high if closed else low <= value < high):
            raise ConfigError(f"config key '{key}' must be in [{low:g}, {high:g}{']' if closed else ')'}, got {value}")
    if cfg.dm.beta_start >= cfg.dm.beta_end:
        raise ConfigError(f"config key 'dm.beta_start' ({cfg.dm.beta_start}) must be below dm.beta_end ({cfg.dm.beta_end})")
    betas = list(cfg.lae.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"config key 'lae.betas' must be two Adam betas in [0, 1), got {betas}")
    for key, groups_key, heads_key in _CHANNELS:
        channels, groups = list(OmegaConf.select(cfg, key)), OmegaConf.select(cfg, groups_key)
        if not channels:
            raise ConfigError(f"config key '{key}' must list at least one channel count, got []")
        bad = [c for c in channels if c <= 0 or c % groups]
        if bad:
            raise ConfigError(f"config key '{key}' has {bad[0]} channels: each level needs a positive multiple of "
                              f"{groups_key} ({groups})")
        if heads_key is not None and channels[0] % OmegaConf.select(cfg, heads_key):
            raise ConfigError(f"config key '{key}': its first level ({channels[0]}) must be divisible by "
                              f"{heads_key} ({OmegaConf.select(cfg, heads_key)})")
    a = cfg.augment
    for key in ("augment.ratios", "augment.random_ratios"):
        bad = [r for r in OmegaConf.select(cfg, key) if not r > 0]
        if bad:
            raise ConfigError(f"config key '{key}' holds {bad[0]}: augmentation ratios (synthetic / real) must be > 0")
    if not a.seeds:
        raise ConfigError("config key 'augment.seeds' must list at least one downstream seed")
    if a.val_fraction == 0 and a.min_val_per_class == 0:
        raise ConfigError("config keys 'augment.val_fraction' and 'augment.min_val_per_class' are both 0: "
                          "no validation split would be left")
    bad = [t for t in a.latent_eval_timesteps if not 0 <= t < cfg.dm.num_train_timesteps]
    if bad:
        raise ConfigError(f"config key 'augment.latent_eval_timesteps' holds {bad[0]}: timesteps are in "
                          f"[0, dm.num_train_timesteps) = [0, {cfg.dm.num_train_timesteps})")


def _check_watch(train, dm) -> None:
    """The watch keys (histodiff/evaluation/watch.py), with what each means in the message."""
    if not train.watch_every >= 0:
        raise ConfigError(f"config key 'train.watch_every' must be >= 0 (0 = off; N = watch every N steps, or every "
                          f"federated round when > 0), got {train.watch_every}")
    if not train.watch_tiles >= 2:
        raise ConfigError(f"config key 'train.watch_tiles' must be >= 2 (FID and KID need 2 tiles), got {train.watch_tiles}")
    if not 1 <= train.watch_grid <= train.watch_tiles:
        raise ConfigError(f"config key 'train.watch_grid' must be in [1, train.watch_tiles = {train.watch_tiles}], "
                          f"got {train.watch_grid}")
    if not 1 <= train.watch_ddim_steps <= dm.num_train_timesteps:
        raise ConfigError(f"config key 'train.watch_ddim_steps' must be in [1, dm.num_train_timesteps = "
                          f"{dm.num_train_timesteps}], got {train.watch_ddim_steps}")


DDP_STRATEGIES = ("auto", "ddp")


def parse_devices(value) -> str | int | list[int]:
    """``train.devices``: ``auto``, a positive number of devices, or device ids ``"0,1"``; ConfigError otherwise."""
    text = str(value).strip()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    parts = [p.strip() for p in text.strip("[]").split(",")]
    if "," in text and all(p.isdigit() for p in parts) and len(set(parts)) == len(parts):
        return [int(p) for p in parts]
    raise ConfigError(f"config key 'train.devices' must be auto, a positive number of devices or device ids such as "
                      f"\"0,1\", got {text!r}")


def _check_devices(cfg: DictConfig) -> None:
    """train.devices / train.strategy: a site's several devices (histodiff/local_training/site_ddp.py)."""
    train = cfg.train
    if train.strategy not in DDP_STRATEGIES:
        raise ConfigError(f"config key 'train.strategy' is {train.strategy!r}; expected one of "
                          f"{', '.join(DDP_STRATEGIES)} (several train.devices always train with DDP, in processes "
                          "the site starts itself)")
    devices = parse_devices(train.devices)
    count = len(devices) if isinstance(devices, list) else devices
    if count == "auto" or count == 1:
        return
    batches = {"tiles.batch_size": cfg.tiles.batch_size, "dm.batch_size": OmegaConf.select(cfg, "dm.batch_size")}
    for key, batch in batches.items():
        if batch is not None and batch % count:
            raise ConfigError(f"config key '{key}' ({batch}) must be a multiple of train.devices ({count}): each "
                              "device trains on an equal share of every batch")
    if cfg.privacy.dp and cfg.privacy.mode == "local":
        raise ConfigError(f"train.devices={count} with DP-SGD (privacy.dp, mode=local): DP-SGD trains in one process; "
                          "set train.devices=1")


def _validate(cfg: DictConfig) -> None:
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(allowed)}")
    _check_ranges(cfg)
    _check_devices(cfg)
    if len(cfg.dm.unet.attention_levels) != len(cfg.dm.unet.block_out_channels):
        raise ConfigError("dm.unet.attention_levels must have one entry per dm.unet.block_out_channels level")
    if len(cfg.latent_classifier.attention_levels) != len(cfg.latent_classifier.block_out_channels):
        raise ConfigError("latent_classifier.attention_levels must have one entry per "
                          "latent_classifier.block_out_channels level")
    if cfg.dm.ddim_steps > cfg.dm.num_train_timesteps:
        raise ConfigError("dm.ddim_steps cannot exceed dm.num_train_timesteps")
    privacy = cfg.privacy
    if privacy.dp:
        if not 0 < privacy.delta < 1 or privacy.target_epsilon <= 0 or privacy.max_grad_norm <= 0:
            raise ConfigError("privacy needs 0 < delta < 1, target_epsilon > 0 and max_grad_norm > 0")
        if privacy.noise_multiplier is not None and privacy.noise_multiplier <= 0:
            raise ConfigError(f"config key 'privacy.noise_multiplier' must be positive, got {privacy.noise_multiplier}")
        if privacy.latent_clip <= 0:
            raise ConfigError(f"config key 'privacy.latent_clip' must be positive, got {privacy.latent_clip}")
        if privacy.noise_multiplier is None and privacy.mode == "local" and privacy.planned_steps <= 0:
            raise ConfigError("privacy.noise_multiplier is null: set privacy.planned_steps (DP steps of the whole run)")
        if privacy.noise_multiplier is None and privacy.mode == "central":
            raise ConfigError("privacy.mode=central needs privacy.noise_multiplier (the server's noise)")
    if privacy.secagg:
        if privacy.secagg_clipping_range <= 0 or privacy.secagg_stats_range <= 0:
            raise ConfigError("privacy.secagg_clipping_range and privacy.secagg_stats_range must be positive")
        if not 2 <= privacy.secagg_quantization_range < 2**31:
            raise ConfigError("privacy.secagg_quantization_range must be in [2, 2**31)")
        if not 0 < privacy.secagg_threshold <= 1:
            raise ConfigError("privacy.secagg_threshold is a fraction of the sites in (0, 1]")
        if privacy.dp and privacy.mode == "central" and privacy.secagg_clipping_range < privacy.max_grad_norm:
            raise ConfigError("privacy.secagg_clipping_range must be >= privacy.max_grad_norm in central mode: "
                              "a clipped update's values must not be clipped again by the quantisation")
    factor = 2 ** (len(cfg.lae.block_out_channels) - 1)
    if cfg.tiles.image_size % factor:
        raise ConfigError(f"tiles.image_size {cfg.tiles.image_size} is not divisible by the LAE factor {factor}")
    latent, unet_factor = cfg.tiles.image_size // factor, 2 ** (len(cfg.dm.unet.block_out_channels) - 1)
    if latent % unet_factor:
        raise ConfigError(f"tiles.image_size {cfg.tiles.image_size} gives {latent} px latents, not divisible by the "
                          f"UNet's {unet_factor} (2 ** (levels of dm.unet.block_out_channels - 1))")


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with command-line style overrides, typed and checked."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from (exc if os.environ.get("HISTODIFF_DEBUG") else None)
    finally:
        GlobalHydra.instance().clear()
    _validate(cfg)
    return cfg


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    cause = exc.__cause__
    if cause is not None and "full_key:" in str(cause):
        lines = str(cause).strip().splitlines()
        key = next(line.split("full_key:")[1].strip() for line in lines if "full_key:" in line)
        if "not in" in lines[0] and lines[0].startswith("Key '"):
            return f"unknown config key '{key}' (see configs/ for the keys that exist)"
        return f"bad value for config key '{key}': {lines[0]}"  # a value of the wrong type
    if "not in struct" in text or "Could not override" in text or ("Key '" in text and "not" in text):
        key = text.split("'")[1] if "'" in text else "?"
        return f"unknown config key '{key}' (see configs/ for the keys that exist)"
    if "Could not find 'profile/" in text:
        name = text.split("'profile/")[1].split("'")[0]
        return f"unknown profile '{name}': use profile=tiny, profile=small or profile=paper"
    return "bad config: " + (text.splitlines()[0] if text else type(exc).__name__)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def main_guard(fn):
    """Run an entry point so that a configuration or input error prints one line and exits 2."""

    def wrapper(argv: list[str] | None = None) -> int:
        from histodiff.errors import InputError

        try:
            return fn(sys.argv[1:] if argv is None else argv) or 0
        except (ConfigError, InputError) as exc:
            if os.environ.get("HISTODIFF_DEBUG"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
