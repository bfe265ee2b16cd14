"""DP-SGD local steps on tiny phantom data: one accountant per site across phases, rounds and restarts; loss falls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histodiff.config import compose
from histodiff.privacy import ACCOUNTANT_FILE, PrivacyBudgetExhausted

ROOT = Path(__file__).resolve().parents[1]
TINY = ["profile=tiny", "weights.perceptual=random", "tiles.image_size=32", "tiles.batch_size=4",
        "train.progress=false", "train.log_every=1000",
        # a smaller UNet than the tiny profile's: per-sample gradients cost params x batch
        "dm.unet.block_out_channels=[16,32]", "dm.unet.attention_levels=[false,true]",
        "privacy.dp=true", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0", "privacy.target_epsilon=50"]



RESTART = """
import json, sys
from histodiff.config import compose
from histodiff.data import TileFolder, TileOptions
from histodiff.autoencoder.kl_autoencoder import build_autoencoder
from histodiff.privacy.dp_train import dp_train_dm_steps
overrides, data, work, state = json.loads(sys.argv[1])
cfg = compose(overrides)
r = dp_train_dm_steps(cfg, TileFolder.open(data, TileOptions(32, augment=True), work_dir=work), state, 2,
                      build_autoencoder(cfg.lae).eval(), 1.0, site="site0")
print(json.dumps({"epsilon": r.metrics["dp-epsilon"], "step": r.step}))
"""


def test_epsilon_accumulates_across_phases_rounds_and_restart_then_site_refuses(phantom_tiles, phantom_unlabeled, tmp_path):
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.privacy.dp_train import dp_train_dm_steps, dp_train_lae_steps
    from histodiff.local_training.trainer_setup import load_state_file

    cfg = compose(TINY)
    site = tmp_path / "site0"
    lae = dp_train_lae_steps(cfg, phantom_tiles, site / "lae", 2, site="site0")
    assert lae.metrics["disc_factor"] == 0.0 and lae.step == 2
    assert set(k.split(".")[0] for k in lae.weights) == {"autoencoder", "discriminator"}
    eps = [lae.metrics["dp-epsilon"]]
    ae = build_autoencoder(cfg.lae).eval()
    dm = dp_train_dm_steps(cfg, phantom_tiles, site / "dm", 2, ae, 1.0, site="site0")
    eps.append(dm.metrics["dp-epsilon"])

    # a SuperNode restart: a new process builds everything from the site's directory
    args = json.dumps([TINY, str(phantom_unlabeled), str(tmp_path / "work2"), str(site / "dm")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", RESTART, args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    after = json.loads(out.stdout.strip().splitlines()[-1])
    assert after["step"] == 4
    eps.append(after["epsilon"])
    assert 0 < eps[0] < eps[1] < eps[2], eps

    saved = json.loads((site / ACCOUNTANT_FILE).read_text())
    assert saved["steps"] == {"lae": 2, "dm": 4} and saved["epsilon"] == pytest.approx(eps[2])
    assert [r["phase"] for r in saved["rounds"]] == ["lae", "dm", "dm"]

    # the same site with a budget it has already spent refuses before touching its state
    spent = compose([*TINY, f"privacy.target_epsilon={eps[2]}"])
    with pytest.raises(PrivacyBudgetExhausted, match="site0: privacy budget exhausted"):
        dp_train_dm_steps(spent, phantom_tiles, site / "dm", 1, ae, 1.0, site="site0")
    assert load_state_file(site / "dm")["step"] == 4
    assert json.loads((site / ACCOUNTANT_FILE).read_text())["epsilon"] == pytest.approx(eps[2])


def test_dp_training_still_reduces_the_loss(phantom_tiles, tmp_path):
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.privacy.dp_train import dp_train_dm_steps

    cfg = compose([*TINY, "tiles.batch_size=8", "privacy.noise_multiplier=0.3", "privacy.target_epsilon=1e6", "dm.lr=1e-3", "dm.warmup_steps=5"])
    ae = build_autoencoder(cfg.lae).eval()
    losses = [dp_train_dm_steps(cfg, phantom_tiles, tmp_path / "dm", 8, ae, 1.0).metrics["loss"] for _ in range(3)]
    assert losses[-1] < 0.95 * losses[0], losses
