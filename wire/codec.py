"""Tensors <-> Flower ``ArrayRecord`` in a transfer dtype (fp32, bf16, fp16, int8); decoding always gives fp32.

What travels in a training round is an *update* (``w_local - w_global`` up, ``g_new - g_held`` down), never whole
weights in a reduced dtype: at the paper's learning rates a round's change of a weight is far below bf16's
resolution of the weight itself, but not of the change.

- bf16: numpy has no bfloat16, so the raw 2-byte words travel with ``stype = "torch.bf16"``.
- int8: per-block absmax. The flattened tensor is cut into blocks of ``INT8_BLOCK`` values; each block travels as
  one fp32 scale (its absmax / 127) and one int8 per value, rounded to nearest: 1 + 4 / 256 bytes per value,
  0.27x fp32. The error of one value is at most half a step, ``absmax / 254``, of its block.
- Error feedback (``ErrorFeedback``): what rounding removed from an update is kept and added to the next one,
  so nothing is lost over rounds; the sum of what arrives trails the sum of what was meant by one round's error.

Integer buffers (BatchNorm's batch counter) travel as they are, in every dtype.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from wire.settings import TRANSFER_DTYPES

BF16_STYPE = "torch.bf16"
INT8_STYPE = "histodiff.int8-absmax"
INT8_BLOCK = 256
NUMPY_STYPE = "numpy.ndarray"  # Flower's SType.NUMPY: np.save's format
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CodecError(ValueError):
    """An array that cannot be decoded (unknown stype, payload of the wrong length); one line."""


def check_dtype(name: str) -> str:
    if name not in TRANSFER_DTYPES:
        raise ValueError(f"transfer-dtype {name!r}; expected one of {', '.join(TRANSFER_DTYPES)}")
    return name


def bytes_per_value(name: str) -> float:
    """Bytes one floating value costs on the wire in ``name`` (int8: with its share of the block scale)."""
    return {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0 + 4.0 / INT8_BLOCK}[check_dtype(name)]


# ---------------------------------------------------------------------------------------------- one tensor


def _int8_encode(t: torch.Tensor) -> Array:
    x = t.reshape(-1).float()
    n = x.numel()
    blocks = -(-n // INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32)
    padded[:n] = x
    padded = padded.view(blocks, INT8_BLOCK)
    scale = padded.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(padded / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
    data = scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes()
    return Array(dtype="int8", shape=tuple(t.shape), stype=INT8_STYPE, data=data)


def _int8_decode(a: Array) -> torch.Tensor:
    shape = tuple(int(s) for s in a.shape)
    n = int(np.prod(shape, dtype=np.int64))
    blocks = -(-n // INT8_BLOCK)
    if len(a.data) != 4 * blocks + n:
        raise CodecError(f"int8 payload of {len(a.data)} bytes, expected {4 * blocks + n} for shape {shape}")
    scale = torch.from_numpy(np.frombuffer(a.data, dtype="<f4", count=blocks).copy())
    q = torch.from_numpy(np.frombuffer(a.data, dtype=np.int8, offset=4 * blocks, count=n).copy()).float()
    padded = torch.zeros(blocks * INT8_BLOCK)
    padded[:n] = q
    return (padded.view(blocks, INT8_BLOCK) * scale[:, None]).reshape(-1)[:n].reshape(shape)


def encode_tensor(t: torch.Tensor, dtype: str = "fp32") -> Array:
    """One tensor as an ``Array``; floating tensors in ``dtype``, integer buffers as they are."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        if check_dtype(dtype) == "int8":
            return _int8_encode(t)
        t = t.to(_TORCH[dtype])
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().tobytes()
        return Array(dtype="bfloat16", shape=tuple(t.shape), stype=BF16_STYPE, data=raw)
    return _numpy_array(t.numpy())


def _numpy_array(arr: np.ndarray) -> Array:
    """``Array(arr)`` with the same bytes (``np.save``'s format), copied once: Flower's own path copies the values
    twice (``np.save`` into a buffer, then ``getvalue``), and ``encode_tensor`` used to add a third."""
    arr = np.asarray(arr)
    if not arr.flags.c_contiguous or arr.dtype.hasobject:
        return Array(np.array(arr, copy=True, order="C"))  # keeps 0-d shapes (ascontiguousarray would not)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    data = b"".join([header.getvalue(), memoryview(arr.reshape(-1)).cast("B")])
    return Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype=NUMPY_STYPE, data=data)


def _numpy_view(a: Array) -> np.ndarray:
    """The values of a ``numpy.ndarray`` Array as a read-only view of its bytes (no copy; ``Array.numpy`` copies)."""
    buf = io.BytesIO(a.data[:4096] if len(a.data) > 4096 else a.data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    if fortran or dtype.hasobject:
        return a.numpy()
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(a.data, dtype=dtype, count=count, offset=buf.tell()).reshape(shape)


def decode_tensor(a: Array, float32: bool = True) -> torch.Tensor:
    """An ``Array`` back to a tensor (floating ones in fp32 unless ``float32`` is false)."""
    if a.stype == INT8_STYPE:
        return _int8_decode(a)
    if a.stype == BF16_STYPE:
        shape = tuple(int(s) for s in a.shape)
        if len(a.data) != 2 * int(np.prod(shape, dtype=np.int64)):
            raise CodecError(f"bf16 payload of {len(a.data)} bytes does not fit shape {shape}")
        t = torch.frombuffer(bytearray(a.data), dtype=torch.bfloat16).reshape(shape)
    elif a.stype == NUMPY_STYPE:
        t = torch.from_numpy(_numpy_view(a).copy())  # one copy, writable, owned by the tensor
    else:
        t = torch.from_numpy(a.numpy().copy())
    return t.float() if float32 and t.is_floating_point() else t


def to_record(weights: dict[str, torch.Tensor], dtype: str = "fp32") -> ArrayRecord:
    record = ArrayRecord()
    for name, t in weights.items():
        record[name] = encode_tensor(t, dtype)
    return record


def from_record(record: ArrayRecord, float32: bool = True) -> dict[str, torch.Tensor]:
    return {name: decode_tensor(a, float32) for name, a in record.items()}


def array_shape(a: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A short content hash (names, shapes, fp32 values) to tell whether two ends hold the same model."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update((t.float() if t.is_floating_point() else t).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- updates


def difference(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``new - base`` for floating arrays; integer buffers keep ``new``'s value (they are replaced, not added),
    and so does an array ``base`` lacks (the what-leaves-a-site check refuses it by name)."""
    return {k: (v.float() - base[k].float() if v.is_floating_point() and k in base else v) for k, v in new.items()}


def apply_update(base: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base + update`` for floating arrays; integer buffers take the update's value."""
    return {k: (v + update[k] if v.is_floating_point() else update[k].clone()) for k, v in base.items()}


class ErrorFeedback:
    """Encode updates in a lossy dtype without losing their sum: ``encode`` adds what earlier roundings removed,
    and keeps what this one removes. The residual lives in memory (server) or in a file (``path``, a site)."""

    def __init__(self, dtype: str, path: str | Path | None = None):
        self.dtype, self.path = check_dtype(dtype), Path(path) if path else None
        self.residual: dict[str, torch.Tensor] = {}
        if self.path is not None and self.lossy and self.path.is_file():
            from safetensors.torch import load_file

            self.residual = load_file(str(self.path))

    @property
    def lossy(self) -> bool:
        return self.dtype != "fp32"

    def encode(self, update: dict[str, torch.Tensor]) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
        """(record to send, what the receiver will decode from it)."""
        record, sent, residual = ArrayRecord(), {}, {}
        for name, u in update.items():
            if u.is_floating_point() and self.lossy:
                r = self.residual.get(name)
                target = u.float() + r if r is not None and r.shape == u.shape else u.float()
                record[name] = encode_tensor(target, self.dtype)
                sent[name] = decode_tensor(record[name])
                residual[name] = target - sent[name]
            else:
                record[name] = encode_tensor(u, self.dtype)
                sent[name] = u.float() if u.is_floating_point() else u
        if self.lossy:
            self.residual = residual
            self._save()
        return record, sent

    def _save(self) -> None:
        if self.path is None:
            return
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in self.residual.items()}, str(tmp))
        tmp.replace(self.path)
