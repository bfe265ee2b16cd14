"""Model factories: paper sizes on the meta device, tiny models run forward."""

import pytest
import torch

from histodiff.config import compose
from histodiff.autoencoder.kl_autoencoder import build_autoencoder
from histodiff.evaluation.image_classifier import build_image_classifier
from histodiff.guidance.latent_classifier_net import build_latent_classifier
from histodiff.diffusion.unet import build_unet
from histodiff.autoencoder.kl_autoencoder import downsample_factor


def _millions(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.fixture(scope="module")
def paper():
    return compose(["profile=paper"])


def test_paper_lae_size(paper):
    with torch.device("meta"):
        ae = build_autoencoder(paper.lae)
    assert downsample_factor(paper.lae) == 4
    assert _millions(ae) == pytest.approx(55.3, rel=0.05)
    assert _millions(ae.encoder) == pytest.approx(22.4, rel=0.05)
    assert _millions(ae.decoder) == pytest.approx(33.0, rel=0.05)


def test_paper_unet_size(paper):
    with torch.device("meta"):
        unet = build_unet(paper)
    assert unet.config.sample_size == 64 and unet.config.in_channels == 3
    assert _millions(unet) == pytest.approx(295, rel=0.05)
    blocks = [type(b).__name__ for b in unet.down_blocks]
    # attention at 64, 32, 16 and 8; none at the 4x4 level (the middle block has its own)
    assert blocks[:4] == ["AttnDownBlock2D"] * 4 and blocks[4] != "AttnDownBlock2D"


def test_paper_latent_classifier_and_downstream_build_on_meta(paper):
    with torch.device("meta"):
        lc = build_latent_classifier(paper)
        vit = build_image_classifier(paper.downstream, num_classes=9)
    assert lc.config.num_classes == 9 and lc.config.sample_size == 64
    assert _millions(vit) == pytest.approx(85.8, rel=0.05)


def test_tiny_models_forward():
    cfg = compose(["profile=tiny"])
    ae, unet, lc = build_autoencoder(cfg.lae), build_unet(cfg), build_latent_classifier(cfg, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    post = ae.encode(x).latent_dist
    z = post.sample()
    assert z.shape == (2, 3, 16, 16)
    assert ae.decode(z).sample.shape == x.shape
    t = torch.tensor([0, 999])
    assert unet(z, t).sample.shape == z.shape
    logits = lc(z, t)
    assert logits.shape == (2, 4)
    # the classifier is time dependent: the same latent at another t gives other logits
    assert not torch.allclose(lc(z, torch.tensor([10, 10])), lc(z, torch.tensor([900, 900])))
    clf = build_image_classifier(cfg.aux_classifier, num_classes=4)
    assert clf(x).shape == (2, 4)


def test_models_round_trip_save_pretrained(tmp_path):
    from histodiff.guidance.latent_classifier_net import TimeLatentClassifier

    cfg = compose(["profile=tiny"])
    lc = build_latent_classifier(cfg, num_classes=3)
    lc.save_pretrained(tmp_path / "lc")
    again = TimeLatentClassifier.from_pretrained(tmp_path / "lc")
    z, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    assert torch.allclose(lc.eval()(z, t), again.eval()(z, t))
    assert (tmp_path / "lc" / "diffusion_pytorch_model.safetensors").exists()
