"""LAE and DM training on tiny models: losses fall, state round-trips, the CLI resumes, sampling works."""

from pathlib import Path

import numpy as np
import pytest
import torch

from histodiff.config import compose
from histodiff.data import TileFolder, TileOptions
from histodiff.diffusion.latent_stats import LatentStats, compute_latent_stats
from histodiff.local_training.local_steps import train_dm_steps, train_lae_steps
from histodiff.diffusion.latent_stats import latent_moments

TINY = ["profile=tiny", "weights.perceptual=random", "tiles.image_size=32", "tiles.batch_size=4",
        "train.progress=false", "train.log_every=1000"]



def test_lae_reconstruction_loss_falls(phantom_tiles, tmp_path):
    cfg = compose([*TINY, "lae.disc_start=100000", "lae.lr=1e-3"])
    first = train_lae_steps(cfg, phantom_tiles, tmp_path, 8).metrics["rec"]
    train_lae_steps(cfg, phantom_tiles, tmp_path, 60)
    last = train_lae_steps(cfg, phantom_tiles, tmp_path, 8)
    assert last.step == 76
    assert last.metrics["rec"] < 0.6 * first, (first, last.metrics["rec"])


def test_dm_loss_falls(phantom_tiles, tmp_path):
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder

    cfg = compose([*TINY, "dm.warmup_steps=5", "dm.lr=1e-3"])
    ae = build_autoencoder(cfg.lae).eval()
    first = train_dm_steps(cfg, phantom_tiles, tmp_path, 8, ae, 1.0).metrics["loss"]
    train_dm_steps(cfg, phantom_tiles, tmp_path, 60, ae, 1.0)
    last = train_dm_steps(cfg, phantom_tiles, tmp_path, 8, ae, 1.0)
    assert last.step == 76
    assert last.metrics["loss"] < 0.8 * first, (first, last.metrics["loss"])


def test_lae_state_round_trips_and_global_weights_override(phantom_tiles, tmp_path):
    from histodiff.local_training.trainer_setup import load_state_file
    from histodiff.autoencoder.lae_module import LAEModule
    from histodiff.local_training.local_steps import load_lae_state

    cfg = compose([*TINY, "lae.disc_start=1"])
    result = train_lae_steps(cfg, phantom_tiles, tmp_path, 3)
    assert set(k.split(".")[0] for k in result.weights) == {"autoencoder", "discriminator"}
    assert not any("perceptual" in k or "lpips" in k for k in result.weights)
    state = load_state_file(tmp_path)
    assert state["step"] == 3 and len(state["optimizers"]) == 2 and state["optimizers"][1]["state"]
    module = LAEModule(cfg)
    assert load_lae_state(module, tmp_path) and module.step == 3
    for k, v in module.autoencoder.state_dict().items():
        assert torch.equal(v, result.weights[f"autoencoder.{k}"])
    # a federated round hands in global weights: they replace the model, the optimiser state stays
    zeros = {k: torch.zeros_like(v) for k, v in result.weights.items()}
    again = train_lae_steps(cfg, phantom_tiles, tmp_path, 1, init_weights=zeros)
    assert again.step == 4
    assert load_state_file(tmp_path)["optimizers"][0]["state"][0]["step"] == 4


def test_dm_state_keeps_ema_and_warmup(phantom_tiles, tmp_path):
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.local_training.trainer_setup import load_state_file
    from histodiff.local_training.local_steps import ema_unet_from_state

    cfg = compose([*TINY, "dm.warmup_steps=10"])
    ae = build_autoencoder(cfg.lae).eval()
    result = train_dm_steps(cfg, phantom_tiles, tmp_path, 4, ae, 0.5)
    assert set(k.split(".")[0] for k in result.weights) == {"unet"}
    state = load_state_file(tmp_path)
    assert state["step"] == 4 and state["ema"]["optimization_step"] == 4
    assert state["optimizer"]["scheduler"]["last_epoch"] == 4  # warm-up continues across calls
    unet = ema_unet_from_state(cfg, tmp_path)
    live = {k: v for k, v in result.weights.items()}
    assert any(not torch.equal(p, live[f"unet.{k}"]) for k, p in unet.state_dict().items())


def test_latent_moments_match_numpy_and_combine():
    rng = np.random.default_rng(0)
    parts = [rng.normal(0.3, 2.0, size=(n, 3, 4, 4)).astype(np.float32) for n in (5, 7, 2)]
    stats = [latent_moments([torch.from_numpy(p)]) for p in parts]
    total = LatentStats.combine(stats)
    everything = np.concatenate([p.ravel() for p in parts]).astype(np.float64)
    assert total.count == everything.size
    assert total.std == pytest.approx(everything.std(), rel=1e-9)
    assert total.scale_factor == pytest.approx(1 / everything.std(), rel=1e-9)


def test_latent_stats_of_a_dataset(phantom_tiles):
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder

    cfg = compose(TINY)
    stats = compute_latent_stats(build_autoencoder(cfg.lae), phantom_tiles, batch_size=8)
    assert stats.count == len(phantom_tiles) * 3 * 8 * 8 and stats.scale_factor > 0


def test_lightning_module_one_batch(phantom_tiles):
    """Lightning style: a Trainer with limit_train_batches=1, no logger, no checkpointing."""
    import lightning as L

    from histodiff.local_training.trainer_setup import step_loader
    from histodiff.autoencoder.lae_module import LAEModule

    cfg = compose([*TINY, "lae.disc_start=0"])
    module = LAEModule(cfg)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, step_loader(phantom_tiles, 4, 1, 0))
    assert module.step == 1 and "d_loss" in module.mean_metrics()


def test_ddim_sampling_is_seeded_and_writes_pngs(tmp_path):
    from PIL import Image

    from histodiff.diffusion.noise_schedule import build_ddim
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.unet import build_unet
    from histodiff.diffusion.ddim_sampling import ddim_sample, decode_latents, save_grid

    cfg = compose(TINY)
    unet, ae = build_unet(cfg).eval(), build_autoencoder(cfg.lae).eval()
    a = ddim_sample(unet, build_ddim(cfg.dm), 2, 5, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(unet, build_ddim(cfg.dm), 2, 5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    images = decode_latents(ae, a, 0.8)
    grid = save_grid(images, tmp_path / "grid.png", nrow=2)
    assert Image.open(grid).size[0] > 32


def test_cli_trains_resumes_and_samples(phantom_unlabeled, tmp_path, capsys):
    from histodiff.cli.train_site import main

    run = tmp_path / "run"
    common = [*TINY, f"data={phantom_unlabeled}", f"run_dir={run}", "train.ckpt_every=2", "train.log_every=1", "dm.ddim_steps=3",
              "sample.num_samples=4", "sample.nrow=2"]
    assert main(["stage=lae", "train.steps=2", *common]) == 0
    assert main(["stage=lae", "train.steps=4", *common]) == 0  # resumes at step 2
    text = (run / "train.log").read_text()
    assert "LAE: resumed at step 2, 2 steps" in text
    assert (run / "lae" / "autoencoder" / "diffusion_pytorch_model.safetensors").exists()
    assert (run / "lae" / "reconstructions.png").exists()
    assert main(["stage=dm", "train.steps=3", *common]) == 0
    for part in ("autoencoder", "unet", "scheduler"):
        assert (run / "global" / part).is_dir()
    assert (run / "latent_stats.json").exists()
    assert list((run / "logs").rglob("metrics.csv")) and list((run / "logs").rglob("events.out.tfevents*"))
    assert main(["stage=sample", *common]) == 0
    assert (run / "samples" / "grid.png").exists() and len(list((run / "samples" / "tiles").glob("*.png"))) == 4


def test_cli_dm_without_lae_is_a_clear_error(phantom_unlabeled, tmp_path, capsys):
    from histodiff.cli.train_site import main

    assert main(["stage=dm", *TINY, f"data={phantom_unlabeled}", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run stage=lae" in err and "\n" not in err


def test_cli_missing_data_is_a_clear_error(tmp_path, capsys):
    from histodiff.cli.train_site import main

    assert main(["stage=lae", *TINY, f"data={tmp_path / 'nope'}", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "\n" not in err


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "he-unlabeled"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/he-unlabeled is absent")
def test_real_unlabeled_tiles_train_and_reconstruct(tmp_path):
    from histodiff.autoencoder.lae_module import LAEModule
    from histodiff.local_training.local_steps import load_lae_state

    cfg = compose([*TINY, "tiles.image_size=64", "lae.disc_start=100000"])
    real = TileFolder.open(SHARED, TileOptions(64, augment=True), work_dir=tmp_path / "work", labeled=False)
    assert len(real) > 100 and real.index.classes == []
    first = train_lae_steps(cfg, real, tmp_path / "lae", 5).metrics["rec"]
    last = train_lae_steps(cfg, real, tmp_path / "lae", 25).metrics["rec"]
    assert last < first
    module = LAEModule(cfg)
    load_lae_state(module, tmp_path / "lae")
    x = torch.stack([real[i][0] for i in range(4)])
    x_hat = module.reconstruct(x)
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
