"""Downstream metrics at the dataset level (checked by hand), validation carving, the per-class table, training."""

import numpy as np
import pytest
import torch

from histodiff.evaluation.downstream import carve_validation, colour_jitter, evaluate
from histodiff.errors import InputError


def _hand(preds, labels, k):
    cm = np.zeros((k, k), dtype=int)
    for p, y in zip(preds, labels):
        cm[y, p] += 1
    tp = np.diag(cm).astype(float)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):  # absent classes score 0, as in torchmetrics
        recall, precision, spec = tp / (tp + fn), tp / (tp + fp), tn / (tn + fp)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return cm, tp.sum() / cm.sum(), f1.mean(), recall.mean(), spec.mean(), recall, spec


def test_metrics_are_dataset_level_and_match_a_hand_computation():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    preds = torch.tensor([0, 0, 1, 2, 1, 1, 0, 2, 2, 2, 1, 0])
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5
    m = evaluate(logits, labels, 3, ["A", "B", "C"])
    cm, acc, f1, sens, spec, recall, spec_c = _hand(preds.tolist(), labels.tolist(), 3)
    assert m["confusion"] == cm.tolist()
    assert m["accuracy"] == pytest.approx(acc) and m["f1"] == pytest.approx(f1)
    assert m["sensitivity"] == pytest.approx(sens) and m["specificity"] == pytest.approx(spec)
    assert [r["class"] for r in m["per_class"]] == ["A", "B", "C"]
    assert [r["support"] for r in m["per_class"]] == [4, 3, 5]
    assert [r["sensitivity"] for r in m["per_class"]] == pytest.approx(recall.tolist())
    assert [r["specificity"] for r in m["per_class"]] == pytest.approx(spec_c.tolist())
    # the mean of per-batch F1 (the original release's metric) is not the dataset-level F1
    batch_f1 = np.mean([_hand(preds[i:i + 4].tolist(), labels[i:i + 4].tolist(), 3)[2] for i in (0, 4, 8)])
    assert not np.isclose(batch_f1, m["f1"])


def test_validation_is_carved_stratified_from_training_tiles_only():
    labels = [0] * 10 + [1] * 5 + [2] * 3
    train, val = carve_validation(labels, 0.2, 1, seed=0)
    assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
    assert [sum(labels[i] == c for i in val) for c in range(3)] == [2, 1, 1]
    assert carve_validation(labels, 0.2, 1, seed=0) == (train, val)
    assert carve_validation(labels, 0.2, 1, seed=1) != (train, val)


def test_a_class_too_small_for_the_validation_split_is_refused():
    with pytest.raises(InputError, match="class TUM has 1 labeled tile"):
        carve_validation([0, 0, 0, 1], 0.2, 1, seed=0, class_names=["ADI", "TUM"])


def test_colour_jitter_is_modest_and_in_range():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    y = colour_jitter(x, 0.1)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert 0 < (y - x).abs().mean() < 0.25


def test_training_picks_the_best_validation_epoch(phantom_labeled):
    from histodiff.config import compose
    from histodiff.data import TileFolder, TileOptions
    from histodiff.evaluation.downstream import predict, train_classifier

    cfg = compose(["profile=tiny", "tiles.image_size=32", "downstream.img_size=32", "downstream.epochs=2",
                   "train.progress=false"])
    data = TileFolder.open(phantom_labeled, TileOptions(32), labeled=True)
    train_idx, val_idx = carve_validation(data.labels, 0.34, 1, 0)
    train = TileFolder(data.index, TileOptions(32, augment=True), subset=train_idx)
    val = TileFolder(data.index, TileOptions(32), subset=val_idx)
    trained = train_classifier(cfg.downstream, cfg.train, train, val, 9, seed=0, batch_size=8)
    assert len(trained.history) == 2
    assert trained.best_val_accuracy == max(h["val_accuracy"] for h in trained.history)
    logits, feats, labels = predict(trained.model, val, 32)
    assert logits.shape == (len(val), 9) and feats.shape[0] == len(val)
    # the returned model is the best epoch's: its val accuracy is the recorded best
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(trained.best_val_accuracy)
