"""reconstruction_metrics (histodiff/evaluation/reconstruction.py) and the uint8 <-> model tensor conversion."""

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from histodiff.data.images import from_uint8_image, to_uint8_image
from histodiff.evaluation.reconstruction import reconstruction_metrics


class _AE(nn.Module):
    """encode -> latent_dist.mode() -> decode(...).sample, with a chosen reconstruction."""

    def __init__(self, rebuild):
        super().__init__()
        self.rebuild = rebuild

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return SimpleNamespace(sample=self.rebuild(z))


class _MeanRedPhi(nn.Module):
    """Class 1 when a tile's red channel is brighter than its blue one, else 0."""

    def forward(self, x):
        d = x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2))
        return torch.stack([-d, d], 1)


def _tiles(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g) * 0.4 - 0.2
    y = torch.arange(n) % 2
    x[y == 1, 0] += 0.5  # class 1: red, class 0: blue
    x[y == 0, 2] += 0.5
    return list(zip(x, y.tolist()))


def test_perfect_reconstructions_keep_every_class_and_score_top_psnr():
    m = reconstruction_metrics(_AE(lambda z: z), _MeanRedPhi(), 16, _tiles(), None, 4)
    assert m["real_accuracy"] == 1.0 and m["reconstruction_accuracy"] == 1.0 and m["gap_points"] == 0
    assert m["psnr"] > 90 and m["l1"] == 0 and m["lpips"] is None and m["tiles"] == 8


def test_colour_swapped_reconstructions_lose_class_and_colour_matching_gives_it_back():
    swap = lambda z: z[:, [2, 1, 0]]  # the structure is kept, the colour is wrong  # noqa: E731
    m = reconstruction_metrics(_AE(swap), _MeanRedPhi(), 16, _tiles(), None, 4)
    assert m["real_accuracy"] == 1.0 and m["reconstruction_accuracy"] == 0.0 and m["gap_points"] == 100
    assert m["colour_matched_accuracy"] == 1.0 and m["psnr"] < 20


def test_uint8_conversion_round_trips():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pixels.flags.writeable = False  # as PIL hands them out
    x = from_uint8_image(pixels)
    assert x.shape == (3, 5, 7) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8_image(x), pixels)
