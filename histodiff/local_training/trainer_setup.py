"""Pieces shared by the LAE and DM loops: step-limited loaders, trainer factory, precision, state files."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"


def step_loader(dataset: Dataset, batch_size: int, steps: int, seed: int, num_workers: int = 0, rank: int = 0,
                world: int = 1, keyed: bool = False) -> DataLoader:
    """A loader that yields exactly ``steps`` full batches (several shuffled passes when needed).

    ``rank``/``world``: a site training on several devices (``site_ddp``); each of the ``world`` processes gets its
    contiguous ``batch_size / world`` tiles of every global batch of ``batch_size``, so the global batches (and the
    effective batch) are those of one process. ``keyed``: batches are ``(images, labels, keys)`` with each tile's key
    (``sample_keys``), and a tile's flips come from its key, not from the process's random stream.
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    if world == 1 and not keyed:
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
    if batch_size % world:
        raise ValueError(f"a batch of {batch_size} tiles cannot be split evenly over {world} devices "
                         "(tiles.batch_size and dm.batch_size must be multiples of train.devices)")
    return DataLoader(
        KeyedTiles(dataset) if keyed else dataset,
        batch_size=batch_size // world,
        sampler=GlobalBatchShard(dataset, batch_size, steps, seed, rank, world, keyed),
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


class GlobalBatchShard(Sampler):
    """Rank ``rank``'s part of each global batch of one shuffled stream (the order ``RandomSampler`` gives with
    ``seed``): tiles ``[rank * b, (rank + 1) * b)`` of every batch of ``batch_size``, ``b = batch_size / world``.
    With ``keyed`` it yields ``(key, index)`` pairs, the key from the seed and the tile's place in the stream."""

    def __init__(self, dataset: Dataset, batch_size: int, steps: int, seed: int, rank: int, world: int, keyed: bool):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.dataset, self.batch_size, self.steps, self.seed = dataset, batch_size, steps, seed
        self.rank, self.world, self.keyed = rank, world, keyed

    def __len__(self) -> int:
        return self.steps * (self.batch_size // self.world)

    def __iter__(self):
        from histodiff.local_training.sample_keys import mix

        generator = torch.Generator().manual_seed(self.seed)
        order = list(RandomSampler(self.dataset, replacement=False, num_samples=self.steps * self.batch_size,
                                   generator=generator))
        part = self.batch_size // self.world
        for step in range(self.steps):
            start = step * self.batch_size + self.rank * part
            for position in range(start, start + part):
                yield (mix(self.seed, position), order[position]) if self.keyed else order[position]


class KeyedTiles(Dataset):
    """``dataset[index]`` with its key appended; the item's random augmentation is seeded by the key."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        from histodiff.local_training.sample_keys import AUGMENT, mix

        key, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(key, AUGMENT))
            sample = self.dataset[index]
        return (*sample, key) if isinstance(sample, (tuple, list)) else (sample, key)


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


def make_trainer(train_cfg, steps: int, loggers: list | bool = False, callbacks: list | None = None,
                 progress: bool | None = None, find_unused: bool = False):
    """A Lightning Trainer that runs one pass over a ``step_loader`` (exactly ``steps`` batches).

    In a rank that ``site_ddp`` started, it trains with Lightning's DDP strategy over the site's devices (the ranks
    exist already, as under torchrun; gloo on CPU, NCCL plus gloo for CPU tensors on GPUs, BatchNorm synchronised
    on GPUs);
    ``find_unused``: DDP looks for parameters a backward pass did not reach (the LAE's two optimisers). Anywhere
    else it trains on one device (the first of ``train.devices``): only the local LAE/DM steps use several.
    """
    import lightning as L

    from histodiff.local_training import site_ddp

    quiet_libraries()
    rank, world = site_ddp.current()
    if world > 1:
        from lightning.fabric.plugins.environments import LightningEnvironment
        from lightning.pytorch.strategies import DDPStrategy

        backend = "cpu:gloo,cuda:nccl" if site_ddp.uses_cuda(train_cfg) else "gloo"
        strategy: Any = DDPStrategy(cluster_environment=LightningEnvironment(), find_unused_parameters=find_unused,
                                    process_group_backend=backend)
        devices: Any = site_ddp.lightning_devices(train_cfg, world)
    else:
        strategy, devices = "auto", site_ddp.lightning_devices(train_cfg, 1)
    show = train_cfg.progress if progress is None else progress
    return L.Trainer(
        accelerator=train_cfg.accelerator,
        devices=devices,
        strategy=strategy,
        sync_batchnorm=world > 1 and site_ddp.uses_cuda(train_cfg),  # torch's SyncBatchNorm is GPU-only
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
        use_distributed_sampler=False,  # step_loader shards the global batches itself (same effective batch)
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
