"""Random draws keyed by a tile's place in the site's global batch, not by the process that draws them.

A site that trains on several devices (``site_ddp``) splits each batch of ``tiles.batch_size`` tiles across its
ranks. If the flips, the posterior sample of the LAE and the DM's noise and timestep came from each process's own
random stream, two devices would train on other random numbers than one device, and the two runs could only be
compared in expectation. Instead, the local-step loaders give every tile a key: a hash of the loader's seed (the
run seed plus the site's step counter) and the tile's position in the round's stream of global batches; each draw
for that tile comes from a generator seeded with the key and a salt per kind of draw. The same tile at the same
place gets the same numbers on 1 or N devices, on CPU or GPU (the draws are made on the CPU), and after a resume.
"""

from __future__ import annotations

import torch

# one salt per kind of draw, so that a tile's flip, posterior sample, noise and timestep are independent
AUGMENT, POSTERIOR, NOISE, TIMESTEP = 1, 2, 3, 4

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 63-bit hash of the integers (fits an int64 tensor and ``torch.Generator.manual_seed``)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


def _generator(key: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix(key, salt))


def keyed_normal(keys: torch.Tensor, salt: int, shape, device=None, dtype=None) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per key: a ``(len(keys), *shape)`` tensor."""
    draws = [torch.randn(tuple(shape), generator=_generator(k, salt)) for k in keys.tolist()]
    return torch.stack(draws).to(device=device, dtype=dtype)


def keyed_randint(keys: torch.Tensor, salt: int, high: int, device=None) -> torch.Tensor:
    """One integer in ``[0, high)`` per key (int64)."""
    values = [int(torch.randint(high, (1,), generator=_generator(k, salt))) for k in keys.tolist()]
    return torch.tensor(values, dtype=torch.long, device=device)


def batch_keys(batch) -> torch.Tensor | None:
    """The keys of a local-step batch ``(images, labels, keys)``; None for a plain ``(images, labels)`` batch."""
    if isinstance(batch, (list, tuple)) and len(batch) > 2 and torch.is_tensor(batch[2]):
        return batch[2]
    return None
