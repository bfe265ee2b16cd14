"""Selective augmentation: real-only centroids, the nearest-centroid + tau filter, quotas, the random control,
the memorisation guard."""

import torch

from histodiff.selection.centroid_filter import (class_centroids, nearest_distance, pixel_rms_distance, quotas, score_candidates,
                                 select_random, select_selective)


def _real():
    feats = torch.tensor([[0.0, 0.0], [0.2, 0.0], [10.0, 0.0], [10.2, 0.0]])
    return feats, torch.tensor([0, 0, 1, 1])


def test_centroids_are_means_of_real_tiles_only():
    feats, labels = _real()
    c = class_centroids(feats, labels, 2)
    torch.testing.assert_close(c, torch.tensor([[0.1, 0.0], [10.1, 0.0]]))
    # scoring synthetic candidates reads the centroids and never moves them
    before = c.clone()
    score_candidates(torch.randn(5, 2) * 50, torch.full((5, 2), 0.5), torch.zeros(5, dtype=torch.long), c)
    assert torch.equal(c, before)


def test_quotas_round_half_up():
    assert quotas({0: 4, 1: 3, 2: 1}, 0.5) == {0: 2, 1: 2, 2: 1}
    assert quotas({0: 4, 1: 3}, 2.0) == {0: 8, 1: 6}


def _candidates():
    feats, labels = _real()
    c = class_centroids(feats, labels, 2)
    # class-0 candidates: near (ranked 3 < 1 < 2), one nearer class 1, one unsure
    cand = torch.tensor([[0.5, 0.0], [1.0, 0.0], [9.0, 0.0], [0.1, 0.1], [0.3, 0.0], [10.0, 0.0], [2.0, 0.0]])
    target = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    conf = torch.tensor([0.9, 0.8, 0.9, 0.95, 0.2, 0.99, 0.9])
    probs = torch.stack([conf, 1 - conf], 1)
    probs[5:] = torch.stack([1 - conf[5:], conf[5:]], 1)
    return score_candidates(cand, probs, target, c), target


def test_filter_keeps_nearest_centroid_and_confident_ranked_by_distance():
    s, target = _candidates()
    assert s.nearest_class.tolist() == [0, 0, 1, 0, 0, 1, 0]
    assert s.nearest_other.tolist() == [1, 1, 1, 1, 1, 0, 0]
    none = torch.zeros(len(target), dtype=torch.bool)
    sel = select_selective("selective_100", s, tau=0.5, want={0: 2, 1: 1}, memorised=none)
    assert sel.indices == [0, 3, 5]  # the two nearest confident class-0 tiles, and the class-1 tile
    assert "nearest centroid is class 1" in sel.reasons[2]
    assert "confidence 0.200 < tau" in sel.reasons[4]
    assert "beyond the quota" in sel.reasons[1]
    assert "nearest centroid is class 0" in sel.reasons[6]
    assert sel.met
    short = select_selective("selective_300", s, tau=0.5, want={0: 6, 1: 3}, memorised=none)
    assert short.shortfall == {0: 3, 1: 2} and not short.met


def test_random_control_draws_the_same_counts_without_filter():
    s, target = _candidates()
    none = torch.zeros(len(target), dtype=torch.bool)
    want = {0: 4, 1: 2}
    sel = select_random("random_100", target, want, none, seed=0)
    got = target[sel.indices].tolist()
    assert got.count(0) == 4 and got.count(1) == 2 and sel.met
    assert select_random("random_100", target, want, none, seed=0).indices == sel.indices
    # over seeds the control takes tiles the filter rejects
    taken = set().union(*(select_random("r", target, {0: 3, 1: 1}, none, seed=k).indices for k in range(20)))
    assert {2, 4, 6} & taken


def test_memorisation_guard_drops_copies_of_training_tiles():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    synth = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    synth[1] = real[3]  # a memorised copy
    synth[2] = (real[0].int() + 1).clamp(0, 255).to(torch.uint8)  # a near copy
    d = pixel_rms_distance(synth, real)
    assert d[1] == 0 and d[2] < 0.01 and d[0] > 0.2 and d[3] > 0.2
    memorised = d < 0.02
    s, _ = _candidates()
    # candidates 0 and 3 (the two best class-0 tiles) are the memorised ones in this scenario
    flags = torch.zeros(7, dtype=torch.bool)
    flags[[0, 3]] = memorised[[1, 2]]
    sel = select_selective("selective_100", s, tau=0.5, want={0: 2, 1: 1}, memorised=flags)
    assert sel.memorised == 2 and 0 not in sel.indices and 3 not in sel.indices
    assert sel.indices == [1, 5] and sel.shortfall == {0: 1, 1: 0}
    assert "memorisation guard" in sel.reasons[0]
    feats = torch.randn(5, 8, generator=g)
    assert nearest_distance(feats[:2].clone(), feats).abs().max() < 1e-6
