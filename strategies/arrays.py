"""Tensors <-> Flower ``ArrayRecord`` in a transfer dtype (fp32, bf16, fp16); decoding always gives fp32.

numpy has no bfloat16, so bf16 arrays travel as their raw 2-byte words with ``stype = "torch.bf16"``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

TRANSFER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_STYPE = "torch.bf16"


def transfer_dtype(name: str) -> torch.dtype:
    if name not in TRANSFER_DTYPES:
        raise ValueError(f"transfer-dtype {name!r}; expected one of {', '.join(TRANSFER_DTYPES)}")
    return TRANSFER_DTYPES[name]


def encode_tensor(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> Array:
    """One tensor as an ``Array``; floating tensors are cast to ``dtype``, integer buffers travel as they are."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        t = t.to(dtype)
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().tobytes()
        return Array(dtype="bfloat16", shape=tuple(t.shape), stype=BF16_STYPE, data=raw)
    return Array(np.array(t.numpy(), copy=True, order="C"))  # keeps 0-d shapes (ascontiguousarray would not)


def decode_tensor(a: Array, float32: bool = True) -> torch.Tensor:
    """An ``Array`` back to a tensor (floating ones in fp32 unless ``float32`` is false)."""
    if a.stype == BF16_STYPE:
        t = torch.frombuffer(bytearray(a.data), dtype=torch.bfloat16).reshape(a.shape)
    else:
        t = torch.from_numpy(a.numpy().copy())
    return t.float() if float32 and t.is_floating_point() else t


def to_record(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> ArrayRecord:
    record = ArrayRecord()
    for name, t in weights.items():
        record[name] = encode_tensor(t, dtype)
    return record


def from_record(record: ArrayRecord, float32: bool = True) -> dict[str, torch.Tensor]:
    return {name: decode_tensor(a, float32) for name, a in record.items()}


def array_shape(a: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A short content hash (names, shapes, fp32 values) to tell whether two sites hold the same model."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update((t.float() if t.is_floating_point() else t).numpy().tobytes())
    return h.hexdigest()[:16]
