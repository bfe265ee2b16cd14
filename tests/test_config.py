"""Configuration: profiles compose, overrides apply, bad keys and values are one-line errors."""

import pytest

from histodiff.config import ConfigError, compose


def test_profiles_compose():
    tiny = compose(["profile=tiny"])
    paper = compose(["profile=paper"])
    assert tiny.tiles.image_size == 64 and paper.tiles.image_size == 256
    assert paper.lae.block_out_channels == [128, 256, 512]
    assert paper.dm.unet.block_out_channels == [192, 384, 384, 768, 768]
    assert paper.dm.num_train_timesteps == tiny.dm.num_train_timesteps == 1000
    assert paper.dm.ddim_steps == 200 and paper.dm.guidance_scale == 1.0
    assert paper.lae.lr == 4.5e-6 and list(paper.lae.betas) == [0.5, 0.9]
    assert paper.lae.disc_start == 50001 and paper.lae.disc_weight == 0.5 and paper.lae.kl_weight == 1e-6
    assert paper.dm.lr == 5e-5 and paper.dm.warmup_steps == 10000 and paper.dm.loss == "l2"
    assert paper.downstream.model == "vit_base_patch16_224"


def test_override_applies():
    cfg = compose(["profile=tiny", "tiles.batch_size=3", "dm.loss=l1", "data=/x"])
    assert cfg.tiles.batch_size == 3 and cfg.dm.loss == "l1" and cfg.data == "/x"


@pytest.mark.parametrize(
    "override, words",
    [
        (["foo=1"], "unknown config key 'foo'"),
        (["tiles.nope=1"], "unknown config key 'tiles.nope'"),
        (["tiles.image_size=abc"], "tiles.image_size"),
        (["dm.loss=l3"], "dm.loss"),
        (["tiles.image_size=-64"], "must be positive"),
        (["tiles.image_size=66"], "not divisible"),
        (["profile=huge"], "profile"),
    ],
)
def test_bad_config_is_one_line(override, words):
    with pytest.raises(ConfigError) as err:
        compose(override)
    message = str(err.value)
    assert words in message and "\n" not in message


def test_entry_point_prints_one_line(capsys):
    from histodiff.cli.train_site import main

    assert main(["profile=tiny", "bogus.key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'bogus'") and "\n" not in err
