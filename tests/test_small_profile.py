"""The `small` profile (docs/small_profile_measurements.md): composes, and keeps the measured choices."""

import pytest

from histodiff.config import ConfigError, compose


def test_small_profile_composes_with_the_measured_sizes():
    cfg = compose(["profile=small"])
    assert cfg.profile == "small" and cfg.tiles.image_size == 64 and cfg.tiles.batch_size == 8
    assert cfg.lae.block_out_channels == [32, 64, 64] and cfg.lae.layers_per_block == 1
    # the discriminator starts only after the budgeted LAE steps (it costs 1.9x per step)
    assert cfg.lae.disc_start > cfg.train.steps
    assert cfg.dm.unet.block_out_channels == [64, 128, 128]
    assert 0 < cfg.dm.warmup_steps < 1500 and cfg.dm.ema_decay < 0.999


def test_small_profile_dm_command_line_composes():
    from histodiff.local_training.local_steps import dm_batch_size

    cfg = compose(["profile=small", "stage=dm", "train.steps=1500"])
    # the DM phase takes its own batch (32) while the LAE keeps tiles.batch_size (8), in one config: the
    # federation runs both phases from one run config
    assert cfg.train.steps == 1500 and dm_batch_size(cfg) == 32 and cfg.tiles.batch_size == 8
    assert dm_batch_size(compose(["profile=tiny"])) == compose(["profile=tiny"]).tiles.batch_size


@pytest.mark.parametrize("value", ["0", "-4"])
def test_dm_batch_size_must_be_positive(value):
    with pytest.raises(ConfigError, match="dm.batch_size"):
        compose(["profile=small", f"dm.batch_size={value}"])


def test_dm_batch_size_refused_with_local_dp():
    with pytest.raises(ConfigError, match="dm.batch_size.*DP-SGD"):
        compose(["profile=tiny", "dm.batch_size=16", "privacy.dp=true", "privacy.mode=local", "privacy.planned_steps=10"])


def test_unknown_profile_names_small_too():
    with pytest.raises(ConfigError) as err:
        compose(["profile=huge"])
    assert "profile=small" in str(err.value)
