"""Pieces shared by the LAE and DM loops: step-limited loaders, trainer factory, precision, state files."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"


def step_loader(dataset: Dataset, batch_size: int, steps: int, seed: int, num_workers: int = 0) -> DataLoader:
    """A loader that yields exactly ``steps`` full batches (several shuffled passes when needed)."""
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=False, num_samples=steps * batch_size, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` means bf16 autocast on GPUs that support it and fp32 elsewhere."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def on_gpu(train_cfg) -> bool:
    return train_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def quiet_libraries() -> None:
    """Keep our progress lines readable: no Lightning tips/banners, no diffusers loading chatter."""
    import warnings

    import diffusers

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    diffusers.utils.logging.set_verbosity_error()
    # frozen LPIPS / encoder modules are in eval mode on purpose
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def make_trainer(train_cfg, steps: int, loggers: list | bool = False, callbacks: list | None = None, progress: bool | None = None):
    """A Lightning Trainer that runs one pass over a ``step_loader`` (exactly ``steps`` batches)."""
    import lightning as L

    quiet_libraries()
    devices: Any = train_cfg.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    show = train_cfg.progress if progress is None else progress
    return L.Trainer(
        accelerator=train_cfg.accelerator,
        devices=devices,
        strategy=train_cfg.strategy,
        precision=resolve_precision(train_cfg.precision, train_cfg.accelerator),
        max_epochs=1,
        limit_train_batches=steps,
        logger=loggers,
        callbacks=callbacks or [],
        enable_checkpointing=False,  # our own state directory is the checkpoint (see StateCheckpoint)
        enable_progress_bar=show,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, int(getattr(train_cfg, "log_every", 1))),  # modules self.log at their global step
        use_distributed_sampler=True,
    )


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": random.getstate()[1],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def save_state_file(directory: Path, state: dict[str, Any]) -> None:
    """Write ``training_state.pt`` atomically so a crash mid-write leaves the previous one intact."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / STATE_FILE)


def load_state_file(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
