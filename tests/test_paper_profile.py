"""The paper profile by construction: one real train step of its LAE and DM (slow on CPU), and on a GPU."""

import pytest
import torch
from torch.utils.data import TensorDataset

from histodiff.config import compose
from histodiff.local_training.local_steps import train_dm_steps, train_lae_steps


def _tiles(size: int, n: int = 2):
    return TensorDataset(torch.rand(n, 3, size, size) * 2 - 1, torch.zeros(n, dtype=torch.long))


def _one_step_each(tmp_path, extra):
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder

    cfg = compose(["profile=paper", "weights.perceptual=random", "tiles.batch_size=1", "tiles.num_workers=0",
                   "lae.disc_start=0", "train.progress=false", *extra])
    data = _tiles(cfg.tiles.image_size)
    lae = train_lae_steps(cfg, data, tmp_path / "lae", 1)
    assert lae.step == 1 and all(torch.isfinite(torch.tensor(v)) for v in lae.metrics.values())
    dm = train_dm_steps(cfg, data, tmp_path / "dm", 1, build_autoencoder(cfg.lae), 1.0)
    assert dm.step == 1 and torch.isfinite(torch.tensor(dm.metrics["loss"]))
    n_unet = sum(v.numel() for v in dm.weights.values() if v.is_floating_point())
    assert n_unet == pytest.approx(295e6, rel=0.05)


@pytest.mark.slow
def test_paper_profile_one_step_on_cpu(tmp_path):
    _one_step_each(tmp_path, ["train.accelerator=cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paper_profile_one_step_on_gpu_bf16(tmp_path):
    from histodiff.local_training.trainer_setup import resolve_precision

    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    assert resolve_precision("auto", "auto") == expected and resolve_precision("auto", "cpu") == "32-true"
    _one_step_each(tmp_path, ["train.devices=1", "tiles.batch_size=2"])
