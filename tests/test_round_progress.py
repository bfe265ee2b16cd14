"""A site's progress inside a round: the Lightning callback logs steps done / total, tiles/s and ETA."""

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from client.round_progress import RoundProgress, _duration


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(12, 1)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return self.layer(x.flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(callback, steps: int = 5, batch: int = 4):
    data = TensorDataset(torch.randn(steps * batch, 3, 2, 2), torch.zeros(steps * batch))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(_Tiny(), DataLoader(data, batch_size=batch))


def test_progress_lines_during_and_at_the_end_of_a_fit(caplog):
    caplog.set_level(logging.INFO, logger="histodiff.site")
    _fit(RoundProgress(total=5, label="site0 lae round 2", every=0.0))
    lines = [r.getMessage() for r in caplog.records if r.name == "histodiff.site"]
    assert lines[0].startswith("site0 lae round 2: step 1/5 (20%), ") and "tiles/s" in lines[0] and "ETA" in lines[0]
    assert any(line.startswith("site0 lae round 2: step 3/5 (60%)") for line in lines)
    assert lines[-1].startswith("site0 lae round 2: step 5/5 (100%) done, ") and "ETA" not in lines[-1]
    assert len(lines) == 6  # one per step (every=0) and the final one


def test_every_throttles_and_the_total_defaults_to_the_trainers(caplog):
    caplog.set_level(logging.INFO, logger="histodiff.site")
    _fit(RoundProgress(every=3600.0), steps=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "histodiff.site"]
    assert len(lines) == 1 and lines[0].startswith("local training: step 3/3 (100%) done")
    tiles_per_s = float(lines[0].split(", ")[1].split()[0])
    assert tiles_per_s > 0


def test_durations_read_like_a_person_would_say_them():
    assert _duration(42.4) == "42 s" and _duration(92) == "1 min 32 s" and _duration(3 * 3600 + 125) == "3 h 2 min"
