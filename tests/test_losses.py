"""LAE loss (adaptive PatchGAN hinge, KL, LPIPS), eps loss and the PatchGAN discriminator on tiny tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histodiff.config import Config, LAEConfig, WeightsConfig
from histodiff.autoencoder.lae_loss import LAELoss, build_lae_loss
from histodiff.diffusion.dm_module import eps_loss
from histodiff.autoencoder.discriminator import PatchDiscriminator, build_discriminator

DISC_START = 5


@pytest.fixture(scope="module")
def loss_fn() -> LAELoss:
    cfg = Config(lae=LAEConfig(disc_start=DISC_START, disc_channels=8, disc_layers=2),
                 weights=WeightsConfig(perceptual="random"))
    torch.manual_seed(0)
    return build_lae_loss(cfg)


@pytest.fixture()
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=3, norm_num_groups=8, sample_size=16)


def _forward(vae):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    posterior = vae.encode(x).latent_dist
    return x, vae.decode(posterior.sample()).sample, posterior


def test_before_disc_start_no_adversarial_term(loss_fn, vae):
    x, x_hat, posterior = _forward(vae)
    calls = []
    hook = loss_fn.discriminator.register_forward_hook(lambda *a: calls.append(1))
    try:
        loss, logs = loss_fn.generator_loss(x, x_hat, posterior, DISC_START - 1, vae.decoder.conv_out.weight)
    finally:
        hook.remove()
    assert calls == [] and logs["g"] == 0.0 and logs["disc_factor"] == 0.0 and logs["d_weight"] == 0.0
    # mean reduction: KL enters per image element (see LAELoss docstring), logged per sample
    kl = posterior.kl().mean().detach()
    want = logs["rec"] + logs["perceptual"] + loss_fn.kl_weight * float(kl) / x[0].numel()
    assert logs["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert logs["total"] == pytest.approx(want, rel=1e-5) and logs["perceptual"] > 0
    with torch.no_grad():  # validation before disc_start
        loss_fn.generator_loss(x, x_hat, posterior, 0, vae.decoder.conv_out.weight)


def test_after_disc_start_adaptive_weight_and_gradients(loss_fn, vae):
    x, x_hat, posterior = _forward(vae)
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, DISC_START, vae.decoder.conv_out.weight)
    assert logs["disc_factor"] == 1.0
    assert 0 < logs["d_weight"] < float("inf") and logs["g"] != 0.0
    loss.backward()
    for p in (vae.decoder.conv_out.weight, vae.decoder.conv_in.weight, vae.encoder.conv_in.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in loss_fn.perceptual.parameters())  # LPIPS stays frozen
    loss_fn.discriminator.zero_grad(set_to_none=True)
    with torch.no_grad():  # validation after disc_start: no gradient to balance, so d_weight is 0
        _, logs = loss_fn.generator_loss(*_forward(vae), DISC_START, vae.decoder.conv_out.weight)
    assert logs["d_weight"] == 0.0 and logs["disc_factor"] == 1.0


class _FixedD(nn.Module):
    """Returns preset logits: first call real, second call fake."""

    def __init__(self, real, fake):
        super().__init__()
        self.outputs = [torch.tensor(real), torch.tensor(fake)]
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.outputs.pop(0) * self.scale


def test_hinge_discriminator_loss_on_known_logits():
    real, fake = [0.5, 2.0, -1.0], [-2.0, 0.0, 0.5]
    fn = LAELoss(_FixedD(real, fake), None, perceptual_weight=0.0, disc_start=10)
    d_loss, logs = fn.discriminator_loss(torch.zeros(1), torch.zeros(1), global_step=10)
    # mean(relu(1 - real)) = (0.5 + 0 + 2) / 3, mean(relu(1 + fake)) = (0 + 1 + 1.5) / 3
    assert d_loss.item() == pytest.approx(5 / 3) and logs["d_loss"] == pytest.approx(5 / 3)
    assert logs["logits_real"] == pytest.approx(0.5) and logs["logits_fake"] == pytest.approx(-0.5)
    fn = LAELoss(_FixedD(real, fake), None, perceptual_weight=0.0, disc_start=10)
    d_loss, _ = fn.discriminator_loss(torch.zeros(1), torch.zeros(1), global_step=9)
    assert d_loss.item() == 0.0
    d_loss.backward()  # a caller may step the discriminator before disc_start: zero gradient, no error


def test_discriminator_loss_trains_only_the_discriminator(loss_fn, vae):
    x, x_hat, _ = _forward(vae)
    d_loss, _ = loss_fn.discriminator_loss(x, x_hat, DISC_START)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert all(p.grad is None for p in vae.parameters())
    loss_fn.discriminator.zero_grad(set_to_none=True)


def test_perceptual_stays_in_eval_mode(loss_fn):
    loss_fn.train()
    assert loss_fn.discriminator.training and not loss_fn.perceptual.training
    assert not any(p.requires_grad for p in loss_fn.perceptual.parameters())


def test_eps_loss_values():
    pred, target = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    assert eps_loss(pred, target).item() == pytest.approx(14 / 3)
    assert eps_loss(pred, target, "l1").item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        eps_loss(pred, target, "huber")


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_patch_discriminator_shapes_and_init(norm):
    torch.manual_seed(0)
    disc = build_discriminator(LAEConfig(disc_channels=16, disc_layers=3), norm=norm)
    out = disc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 1]  # doubling, capped at 8x
    assert convs[1].weight.std().item() == pytest.approx(0.02, rel=0.1)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
    assert has_bn == (norm == "batch")


def test_paper_discriminator_size():
    disc = PatchDiscriminator(3, 64, 3)
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633  # pix2pix / LDM NLayerDiscriminator (convs without bias before BatchNorm)
