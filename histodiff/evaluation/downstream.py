"""Downstream (and auxiliary) image classifiers: validation carving, training with model selection on the
validation split, dataset-level metrics (torchmetrics), features for selection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric
from torch.utils.data import DataLoader, Dataset

from histodiff.errors import InputError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- splits


def carve_validation(labels: Sequence[int], fraction: float, min_per_class: int, seed: int,
                     class_names: Sequence[str] | None = None,
                     groups: Sequence[Hashable | None] | None = None) -> tuple[list[int], list[int]]:
    """Stratified (train, val) positions: per class max(min_per_class, round(fraction * n)) go to val.

    ``groups`` (one per tile: its slide or patient, None when unknown) keeps every group on one side: whole groups
    go to val until each class has its share (never less: the per-class minimum holds, whole groups may overshoot
    it), and every class keeps at least one training tile. Tiles without a group are each their own group, so
    without groups (or with None for every tile) the split is exactly the per-tile one. Classes are visited in
    order, each drawing one permutation of its groups not yet in val from the seeded generator; within it, groups
    that fit the remaining shares of all their classes are taken first, then the one that fills the class's share
    with the fewest tiles beyond the shares.

    The test set is never an input here, so model selection cannot see it.
    """
    gen = torch.Generator().manual_seed(seed)
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    name = (lambda c: class_names[c] if class_names is not None else str(c))
    # units: the groups in order of their first tile (a tile without a group is a unit of its own)
    units: list[list[int]] = []
    unit_of_group: dict[Hashable, int] = {}
    for i in range(len(labels)):
        g = groups[i] if groups is not None else None
        if g is None or g not in unit_of_group:
            if g is not None:
                unit_of_group[g] = len(units)
            units.append([i])
        else:
            units[unit_of_group[g]].append(i)
    count: list[dict[int, int]] = []  # per unit: class -> tiles
    units_of_class: dict[int, list[int]] = {}
    for u, members in enumerate(units):
        per: dict[int, int] = {}
        for i in members:
            per[int(labels[i])] = per.get(int(labels[i]), 0) + 1
        count.append(per)
        for c in per:
            units_of_class.setdefault(c, []).append(u)
    total = {c: sum(count[u][c] for u in us) for c, us in units_of_class.items()}
    want = {c: max(min_per_class, int(round(fraction * n))) for c, n in total.items()}
    for c in sorted(total):
        if total[c] < want[c] + 1:
            raise InputError(f"class {name(c)} has {total[c]} labeled tile(s); at least {want[c] + 1} are needed "
                             f"({want[c]} for the validation split, 1 for training)")

    in_val: set[int] = set()
    val_count = {c: 0 for c in total}

    def leaves_training(u: int) -> bool:  # every class of the unit keeps a tile outside val
        return all(total[d] - val_count[d] - n >= 1 for d, n in count[u].items())

    def excess(u: int) -> int:  # validation tiles beyond the share, over all classes, were the unit taken
        return sum(max(0, val_count[d] + n - max(want[d], val_count[d])) for d, n in count[u].items())

    def take(u: int) -> None:
        in_val.add(u)
        for d, n in count[u].items():
            val_count[d] += n

    for c in sorted(total):
        free = [u for u in units_of_class[c] if u not in in_val]
        order = [free[j] for j in torch.randperm(len(free), generator=gen).tolist()]
        for u in order:  # groups that fit the remaining shares of all their classes, in the drawn order
            if val_count[c] >= want[c]:
                break
            if excess(u) == 0 and leaves_training(u):
                take(u)
        while val_count[c] < want[c]:  # then the group that fills it with the least excess (else the largest)
            rest = [u for u in order if u not in in_val and leaves_training(u)]
            if not rest:
                raise InputError(
                    f"class {name(c)}: its {total[c]} labeled tile(s) lie in {len(units_of_class[c])} slide(s) or "
                    f"group(s); {want[c]} must go to the validation split and at least 1 stay for training without "
                    f"splitting a slide: add slides of this class or lower augment.min_val_per_class")
            filling = [u for u in rest if val_count[c] + count[u][c] >= want[c]]
            take(min(filling, key=lambda u: (excess(u), count[u][c])) if filling else
                 max(rest, key=lambda u: (count[u][c], -excess(u))))
    val = sorted(i for u in in_val for i in units[u])
    chosen = set(val)
    return [i for i in range(len(labels)) if i not in chosen], val


# ------------------------------------------------------------------------------------------- training


def fit_input(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize tiles to the classifier's input size (e.g. 256 px tiles for a 224 px ViT)."""
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return x


def colour_jitter(x: torch.Tensor, strength: float = 0.1) -> torch.Tensor:
    """Modest per-tile brightness, contrast and saturation jitter on [-1, 1] images (stain variation)."""
    b = x.shape[0]
    shape = (b, 1, 1, 1)
    bright = (torch.rand(shape, device=x.device) * 2 - 1) * strength
    contrast = 1 + (torch.rand(shape, device=x.device) * 2 - 1) * strength
    sat = 1 + (torch.rand(shape, device=x.device) * 2 - 1) * strength
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * sat
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(-1, 1)


class ClassifierModule(L.LightningModule):
    """A timm classifier trained with cross-entropy; keeps the weights of its best validation epoch."""

    JITTER = 0.1  # colour-jitter strength of the training batches

    def __init__(self, model: torch.nn.Module, img_size: int, lr: float, weight_decay: float, epochs: int,
                 name: str = "classifier") -> None:
        super().__init__()
        self.model, self.img_size, self.lr, self.wd, self.epochs = model, img_size, lr, weight_decay, epochs
        self.name = name
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best = (-1.0, float("inf"))  # (val accuracy, val loss): higher accuracy, then lower loss
        self.history: list[dict[str, float]] = []
        # epoch means: training loss; validation loss and accuracy weighted by batch size (= over all tiles)
        self.train_loss, self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric(), MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(fit_input(x, self.img_size))

    def _common_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = colour_jitter(x, self.JITTER)
        loss, _, _ = self._common_step((x, y))
        self.train_loss.update(loss.detach())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, y = self._common_step(batch)
        self.val_loss.update(loss.detach().float(), weight=len(y))
        self.val_accuracy.update((logits.argmax(1) == y).float().mean(), weight=len(y))

    def on_validation_epoch_end(self) -> None:
        acc, loss = float(self.val_accuracy.compute()), float(self.val_loss.compute())
        train_loss = float(self.train_loss.compute()) if self.train_loss.update_count else 0.0
        for metric in (self.train_loss, self.val_loss, self.val_accuracy):
            metric.reset()
        self.log_dict({"val_loss": loss, "val_accuracy": acc}, on_epoch=True, logger=bool(self.loggers))
        epoch = self.current_epoch + 1
        self.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": loss, "val_accuracy": acc})
        if (acc, -loss) > (self.best[0], -self.best[1]):
            self.best = (acc, loss)
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        log.info("%s: epoch %d/%d train loss %.4f, val loss %.4f, val accuracy %.3f", self.name, epoch,
                 self.epochs, train_loss, loss, acc)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.wd)


def loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    # BatchNorm cannot train on a batch of one: drop a ragged last batch when there is more than one batch
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers,
                      drop_last=shuffle and len(dataset) > batch_size)


@dataclass
class TrainedClassifier:
    model: torch.nn.Module
    img_size: int
    best_val_accuracy: float
    history: list[dict[str, float]]


def train_classifier(clf_cfg, train_cfg, train_set: Dataset, val_set: Dataset, num_classes: int, seed: int,
                     batch_size: int, name: str = "classifier", num_workers: int = 0) -> TrainedClassifier:
    """Train a timm model from ``clf_cfg``; return the weights of its best epoch on ``val_set``."""
    from histodiff.evaluation.image_classifier import build_image_classifier
    from histodiff.local_training.trainer_setup import quiet_libraries, resolve_precision, seed_everything

    quiet_libraries()
    seed_everything(seed)
    model = build_image_classifier(clf_cfg, num_classes)
    module = ClassifierModule(model, clf_cfg.img_size, clf_cfg.lr, clf_cfg.weight_decay, clf_cfg.epochs, name)
    # one device: the best-epoch weights are kept in this process's memory
    trainer = L.Trainer(accelerator=train_cfg.accelerator, devices=1,
                        precision=resolve_precision(train_cfg.precision, train_cfg.accelerator),
                        max_epochs=clf_cfg.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=bool(train_cfg.progress), enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, loader(train_set, batch_size, True, seed, num_workers),
                loader(val_set, batch_size, False, num_workers=num_workers))
    if module.best_state is not None:
        model.load_state_dict(module.best_state)
    return TrainedClassifier(model.cpu().eval(), clf_cfg.img_size, module.best[0], module.history)


# ------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, img_size: int, batch_size: int = 32,
            device: str | torch.device = "cpu", on_batch: Callable[[torch.Tensor], None] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, pooled features, labels) over a whole dataset, in order; ``on_batch(x)`` sees every batch of
    images too (more features from the same pass, each tile decoded once)."""
    model = model.to(device).eval()
    logits, feats, labels = [], [], []
    for x, y in loader(dataset, batch_size, False):
        if on_batch is not None:
            on_batch(x)
        f = model.forward_head(model.forward_features(fit_input(x.to(device), img_size)), pre_logits=True)
        feats.append(f.float().cpu())
        logits.append(model.get_classifier()(f).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(feats), torch.cat(labels)


def evaluate(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Dataset-level metrics in one pass over all predictions: accuracy (micro), macro F1, macro sensitivity
    (recall), macro specificity; a per-class table and the confusion matrix (rows: true, columns: predicted)."""
    from torchmetrics.functional.classification import (multiclass_accuracy, multiclass_confusion_matrix,
                                                        multiclass_f1_score, multiclass_precision,
                                                        multiclass_recall, multiclass_specificity)

    preds = logits.argmax(dim=1)
    kw = dict(num_classes=num_classes)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    per = {key: fn(preds, labels, average=None, **kw).tolist() for key, fn in
           (("precision", multiclass_precision), ("sensitivity", multiclass_recall),
            ("specificity", multiclass_specificity), ("f1", multiclass_f1_score))}
    confusion = multiclass_confusion_matrix(preds, labels, **kw)
    support = confusion.sum(dim=1).tolist()
    return {
        "accuracy": float(multiclass_accuracy(preds, labels, average="micro", **kw)),
        "f1": float(multiclass_f1_score(preds, labels, average="macro", **kw)),
        "sensitivity": float(multiclass_recall(preds, labels, average="macro", **kw)),
        "specificity": float(multiclass_specificity(preds, labels, average="macro", **kw)),
        "n": int(len(labels)),
        "per_class": [{"class": names[c], "support": int(support[c]), **{k: float(v[c]) for k, v in per.items()}}
                      for c in range(num_classes)],
        "confusion": confusion.tolist(),
    }
