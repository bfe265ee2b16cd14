"""The method's equations, each tested so that the known ways of getting it wrong fail:

- eq. 5, decoder fine-tuning: only D learns (E and phi stay frozen; the DM is not an input at all), and the CE term
  is what makes phi recognise D'(z) better than the same steps without it;
- eq. 6, the latent classifier: its training timesteps cover 1..T (the original release trained at t = 0 only);
- guidance: eps_hat = eps - g * sqrt(1 - abar_t) * grad log p(y | z_t) (the factor neither dropped nor squared);
- the downstream classifier's ``pretrained_path`` refuses files with missing, unexpected or reshaped tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from histodiff.config import compose
from histodiff.errors import InputError


def _cfg(*extra: str):
    return compose(["profile=tiny", "weights.perceptual=random", "tiles.image_size=32", "tiles.batch_size=8",
                    "aux_classifier.img_size=32", "lae.perceptual_weight=0", *extra])


# ---------------------------------------------------------------------------------------------- eq. 5


def _ce_on_reconstructions(autoencoder, phi, dataset) -> float:
    from histodiff.evaluation.downstream import fit_input

    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.as_tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        x_hat = autoencoder.decode(autoencoder.encode(x).latent_dist.mode()).sample
        return float(F.cross_entropy(phi(fit_input(x_hat, 32)), y))


def test_eq5_only_the_decoder_learns_and_the_ce_term_is_what_helps_phi(phantom_labeled):
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.data import TileFolder, TileOptions
    from histodiff.finetune.decoder_finetune import finetune_decoder

    torch.manual_seed(0)
    base = _cfg()
    autoencoder = build_autoencoder(base.lae).eval()
    # a frozen classifier with decisive logits (a fresh timm net predicts uniformly, so CE would give no signal)
    phi = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 9)).eval()
    with torch.no_grad():
        phi[2].weight.mul_(20.0)
    tiles = TileFolder.open(phantom_labeled, TileOptions(32), labeled=True)
    frozen_phi = {k: v.clone() for k, v in phi.state_dict().items()}
    ce_before = _ce_on_reconstructions(autoencoder, phi, tiles)

    tuned = {}
    for lam in (0.0, 2.0):
        cfg = _cfg("augment.decoder_steps=25", "augment.decoder_lr=1e-3", f"augment.lambda_ce={lam}")
        ae = copy.deepcopy(autoencoder)
        finetune_decoder(cfg, ae, phi, 32, tiles)
        tuned[lam] = ae
        for name, p in autoencoder.encoder.state_dict().items():
            assert torch.equal(p, ae.encoder.state_dict()[name]), f"encoder tensor {name} changed"
        assert any(not torch.equal(p, ae.decoder.state_dict()[n]) for n, p in autoencoder.decoder.state_dict().items())
        assert all(torch.equal(v, phi.state_dict()[k]) for k, v in frozen_phi.items()), "phi changed"

    ce_without = _ce_on_reconstructions(tuned[0.0], phi, tiles)
    ce_with = _ce_on_reconstructions(tuned[2.0], phi, tiles)
    assert ce_with < ce_without - 0.05, (ce_before, ce_without, ce_with)


# ---------------------------------------------------------------------------------------------- eq. 6


class _RecordingClassifier(torch.nn.Module):
    """A linear latent classifier that remembers every timestep it was trained at."""

    def __init__(self, shape: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(int(torch.tensor(shape).prod()), classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(torch.as_tensor(t).detach().flatten().cpu())
        return self.linear(z.flatten(1))


def test_eq6_training_timesteps_cover_1_to_T():
    from histodiff.diffusion.noise_schedule import build_noise_scheduler
    from histodiff.guidance.latent_classifier_training import train_latent_classifier

    cfg = _cfg("latent_classifier.steps=60")
    alphas = build_noise_scheduler(cfg.dm).alphas_cumprod
    T = len(alphas)
    z, y = torch.randn(32, 3, 8, 8), torch.arange(32) % 4
    clf = _RecordingClassifier((3, 8, 8), 4)
    train_latent_classifier(cfg, clf, alphas, z, y)
    t = torch.cat(clf.seen).float()
    assert len(t) >= 60 * 8
    # uniform over 0..T-1 (the paper's 1..T): both ends reached, the mean in the middle, every tenth filled
    assert t.min() <= 0.02 * T and t.max() >= 0.98 * (T - 1)
    assert abs(t.mean().item() - (T - 1) / 2) < 0.1 * T
    assert torch.histc(t, bins=10, min=0, max=T - 1).min() > 0.05 * len(t)


def test_eq6_noised_latents_follow_the_forward_process():
    from histodiff.guidance.latent_classifier_training import LatentClassifierModule

    alphas = torch.linspace(0.999, 0.01, 1000)
    module = LatentClassifierModule(torch.nn.Identity(), alphas, 1e-3, 1)
    z0, noise = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    t = torch.tensor([0, 999])
    assert torch.allclose(module.noised(z0, t, noise).flatten(), alphas[t].sqrt())


# ---------------------------------------------------------------------------------------------- guidance


def test_guidance_scales_the_gradient_by_sqrt_one_minus_abar():
    from histodiff.guidance.classifier_guidance import classifier_guidance

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 3)

    def classifier(z, t):
        return linear(z.flatten(1))

    alphas = torch.linspace(0.9999, 0.02, 1000)
    labels = torch.tensor([0, 2])
    z, eps = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    scale = 3.0
    z_req = z.clone().requires_grad_(True)
    logp = torch.log_softmax(linear(z_req.flatten(1)), dim=-1).gather(1, labels.view(-1, 1)).sum()
    grad = torch.autograd.grad(logp, z_req)[0]
    guide = classifier_guidance(classifier, alphas, labels, scale)
    for t in (3, 500, 990):  # abar near 1, about a half, near 0: a dropped or squared factor differs at each
        expected = eps - scale * (1 - alphas[t]).sqrt() * grad
        assert torch.allclose(guide(z, torch.tensor(t), eps), expected, atol=1e-6), t
        assert not torch.allclose(expected, eps - scale * grad, atol=1e-4)
        assert not torch.allclose(expected, eps - scale * (1 - alphas[t]) * grad, atol=1e-4)


# ---------------------------------------------------------------------------------------------- pretrained_path


@pytest.fixture()
def resnet_file(tmp_path):
    import timm

    source = timm.create_model("resnet10t", num_classes=5)
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return source, path


def _clf_cfg(path):
    return _cfg(f"downstream.pretrained_path={path}").downstream


def test_pretrained_path_loads_the_backbone_and_keeps_our_head(resnet_file):
    from histodiff.evaluation.image_classifier import build_image_classifier

    source, path = resnet_file
    model = build_image_classifier(_clf_cfg(path), 9)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.fc.out_features == 9


@pytest.mark.parametrize("damage", ["missing", "unexpected", "reshaped", "other-model"])
def test_pretrained_path_refuses_a_file_that_does_not_fit(resnet_file, tmp_path, damage):
    import timm
    from safetensors.torch import load_file

    from histodiff.evaluation.image_classifier import build_image_classifier

    _, path = resnet_file
    state = load_file(str(path))
    if damage == "missing":
        state.pop("layer2.0.conv1.weight")
    elif damage == "unexpected":
        state["extra.weight"] = torch.zeros(3)
    elif damage == "reshaped":
        state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    else:
        state = timm.create_model("resnet18", num_classes=5).state_dict()
    bad = tmp_path / f"{damage}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(InputError, match="pretrained_path") as err:
        build_image_classifier(_clf_cfg(bad), 9)
    assert "\n" not in str(err.value)
