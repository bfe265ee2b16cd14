"""A site with several devices: its local LAE/DM steps in one process per device, Lightning DDP inside.

Lightning's own ``ddp`` launcher starts ranks 1..N-1 by running ``sys.argv`` again as a script. Inside a Flower
ClientApp (a process the SuperNode starts, whose command line is Flower's, not ours) that runs the wrong program,
and ``ddp_spawn``/``ddp_fork`` hand back only the weights (not the optimiser state, the step counter or the round's
metrics), fork besides under the ClientApp's gRPC threads. So ``launch`` starts the ranks itself, as fresh
interpreters (``python -c``, the caller's import path; nothing of the caller's ``__main__`` runs again, unlike
multiprocessing's spawn), each told its place the way torchrun does (``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``), so that Lightning's DDP strategy joins them instead of starting processes (``make_trainer``): gloo on CPU, NCCL on GPUs.

Every rank runs the same local-step function on the same state directory: it loads the same state, gets its share
of each global batch (``step_loader``: ``tiles.batch_size / N`` tiles per rank, the same global batches and random
draws as one device, ``sample_keys``), and DDP averages the gradients, so all ranks take the same optimiser steps.
Only rank 0 writes the state and checkpoints. The parent checks that every rank ended with the same shared weights
(a digest per rank) and returns rank 0's result, with the round's metrics averaged over the ranks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from histodiff.config import parse_devices

log = logging.getLogger(__name__)

_CURRENT = (0, 1)  # (rank, world) of this process; a rank started by ``launch`` sets it


# ------------------------------------------------------------------------------------------- the config keys


def uses_cuda(train_cfg) -> bool:
    return train_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def world_size(train_cfg) -> int:
    """How many processes the site's local steps run in: one per device (``auto``: every GPU, else one)."""
    devices = parse_devices(train_cfg.devices)
    cuda = uses_cuda(train_cfg)
    if devices == "auto":
        return max(1, torch.cuda.device_count()) if cuda else 1
    count = len(devices) if isinstance(devices, list) else devices
    if cuda and isinstance(devices, int) and count > torch.cuda.device_count():
        raise ValueError(f"train.devices={count} but this machine has {torch.cuda.device_count()} GPU(s)")
    return count


def lightning_devices(train_cfg, world: int) -> int | list[int]:
    """What the Trainer gets as ``devices``: the GPU ids when they were named, else a count (one outside a rank)."""
    devices = parse_devices(train_cfg.devices)
    if isinstance(devices, list) and uses_cuda(train_cfg):
        return devices if world > 1 else devices[:1]
    return world


def current() -> tuple[int, int]:
    """(rank, world) of this process: (0, 1) unless ``launch`` started it."""
    return _CURRENT


def wants_ranks(train_cfg) -> bool:
    """Whether a local-step call here should start its ranks (several devices, and not already inside a rank)."""
    return _CURRENT[1] == 1 and world_size(train_cfg) > 1


# ------------------------------------------------------------------------------------------------- launching


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of ``weights`` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, args: tuple, kwargs: dict, train_cfg, state_dir: Path):
    """Run ``fn(*args, **kwargs)`` (a local-step function returning a ``LocalResult``) in one process per device.

    The call is handed to the ranks through a file in ``state_dir`` (tensors memory-mapped there, no file
    descriptor per tensor); their results come back the same way and the folder is removed afterwards."""
    from histodiff.local_training.local_steps import LocalResult

    world = world_size(train_cfg)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    level = logging.getLogger("histodiff").getEffectiveLevel()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".ranks-", dir=state_dir) as tmp:
        torch.save({"fn": fn, "args": args, "kwargs": kwargs}, Path(tmp) / "call.pt")
        log.info("%s: %d processes (DDP, %s) on %s", getattr(fn, "__name__", "local steps"), world,
                 "nccl" if uses_cuda(train_cfg) else "gloo", state_dir)
        _run_ranks(world, tmp, level)
        outs = [torch.load(Path(tmp) / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(world)]
    for rank, out in enumerate(outs[1:], start=1):
        if out["digest"] != outs[0]["digest"] or out["step"] != outs[0]["step"]:
            raise RuntimeError(f"site DDP: rank {rank} ended at step {out['step']} with weights {out['digest'][:12]}, "
                               f"rank 0 at step {outs[0]['step']} with {outs[0]['digest'][:12]}: the ranks diverged")
    _merge_state_seconds(outs[0].get("state_seconds") or {})
    for callback, state in zip(kwargs.get("callbacks") or [], outs[0].get("callbacks") or []):
        callback.__dict__.update(state)  # e.g. a progress callback's seconds, as if it had run here
    log.info("%s: %d processes took %.1f s", getattr(fn, "__name__", "local steps"), world, time.perf_counter() - start)
    # every rank took the same number of steps, so the mean over ranks of each rank's mean is the mean over the
    # global batches (equal shares of each batch), whether or not the ranks already synchronised their metrics
    keys = outs[0]["metrics"].keys()
    metrics = {k: sum(float(o["metrics"][k]) for o in outs) / world for k in keys}
    return LocalResult(weights=outs[0]["weights"], metrics=metrics, num_examples=outs[0]["num_examples"],
                       step=outs[0]["step"])


def _run_ranks(world: int, tmp: str, level: int) -> None:
    """Start the ranks as fresh interpreters (``python -c``: nothing of the caller's ``__main__`` runs again) with
    this process's import path, wait for all, and stop the others as soon as one fails."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    code = ("import sys; from histodiff.local_training import site_ddp; "
            "site_ddp._rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world), str(port), tmp, str(level)], env=env)
             for r in range(world)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                raise RuntimeError(f"site DDP: rank {failed[0]} of {world} exited with code {codes[failed[0]]} "
                                   "(its error is above); the other ranks were stopped")
            if all(c == 0 for c in codes):
                return
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _merge_state_seconds(seconds: dict) -> None:
    """The state load/save times rank 0 measured, added to this process's (where local_steps keeps them)."""
    from histodiff.local_training import local_steps

    target = getattr(local_steps, "STATE_SECONDS", None)
    if isinstance(target, dict):
        for k, v in seconds.items():
            target[k] = target.get(k, 0.0) + float(v)


def _plain(value) -> bool:
    """Numbers, strings and containers of them: the callback state rank 0 hands back (never tensors or models)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _rank_logging(level: int, rank: int) -> None:
    """The parent's progress lines (``histodiff.*``) from rank 0; warnings and errors from every rank."""
    package = logging.getLogger("histodiff")
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(name)s [rank {rank}]: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
    package.setLevel(level if rank == 0 else max(level, logging.WARNING))


def _rank_main(rank: int, world: int, port: int, tmp: str, level: int) -> None:
    global _CURRENT
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the site's cores
    _rank_logging(level, rank)
    _CURRENT = (rank, world)
    call = torch.load(Path(tmp) / "call.pt", map_location="cpu", weights_only=False, mmap=True)
    result = call["fn"](*call["args"], **call["kwargs"])
    out: dict[str, Any] = {"digest": weights_digest(result.weights), "metrics": result.metrics, "step": result.step,
                           "num_examples": result.num_examples}
    if rank == 0:
        from histodiff.local_training import local_steps

        out["weights"] = result.weights
        out["state_seconds"] = dict(getattr(local_steps, "STATE_SECONDS", {}) or {})
        out["callbacks"] = [{k: v for k, v in vars(c).items() if _plain(v)} for c in call["kwargs"].get("callbacks") or []]
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
