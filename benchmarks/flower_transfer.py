"""Extra memory of pushing and pulling one message through Flower's object transfer, Flower 1.42's functions against
``wire.flower_transfer``'s: ``python -m benchmarks.flower_transfer [--mb 1154] [--latency-ms 20]``.

A message with one ``ArrayRecord`` of ``--mb`` MB of float32 (arrays of ``--array-mb`` MB, random, so every 5 MB
chunk is its own object; plus ``--zero-mb`` MB of zeros, whose equal chunks are one object shared by its arrays):

- **push**: ``push_objects`` (what the ServerApp's ``push_messages`` and the ClientApp's reply call) with an upload
  function that takes ``--latency-ms`` per object (a stand-in for the upload; not measured here) and keeps
  nothing;
- **pull**: ``inflate_object_from_contents`` on the message's pulled contents (what ``pull_messages`` does once
  every object is in).

Memory is ``tracemalloc``'s count, deterministic for a given size, in MB and in multiples of the message's bytes.
Push: the peak during the call over what was allocated before it (the message itself is not counted). Pull: the
peak from the pulled contents (counted: they are the pull's memory) to the built message. The pulled
arrays are checked equal to the pushed ones.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

MB = 1024 ** 2


def build_message(mb: float, array_mb: float, zero_mb: float, seed: int = 0):
    from flwr.app import Array, ArrayRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:  # outside a Flower process: Message() needs an identity to stamp
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rng = np.random.default_rng(seed)
    arrays, left, i = {}, int(mb * MB) // 4, 0
    per = max(1, int(array_mb * MB) // 4)
    while left > 0:
        n = min(per, left)
        arrays[f"w{i:04d}"] = Array(rng.standard_normal(n, dtype=np.float32))
        left, i = left - n, i + 1
    for j in range(2 if zero_mb > 0 else 0):  # two equal arrays of zeros: their chunks are shared objects
        arrays[f"zero{j}"] = Array(np.zeros(int(zero_mb * MB) // 8, dtype=np.float32))
    msg = Message(RecordDict({"arrays": ArrayRecord(arrays)}), dst_node_id=1, message_type="train")
    return msg


def _peak_during(fn) -> tuple[int, float]:
    """(peak extra bytes over what was allocated at the start, seconds) of ``fn()``."""
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    return peak - base, seconds


def measure(mb: float, array_mb: float, zero_mb: float, latency_ms: float) -> dict:
    from flwr.app import Message
    from flwr.supercore.inflatable import inflatable_utils as iu
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from wire import flower_transfer

    push, pull = flower_transfer.flowers_own()
    flower = {"push": push, "pull": pull}
    ours = {"push": flower_transfer.push_contents_bounded, "pull": flower_transfer.inflate_releasing_chunks}
    msg = build_message(mb, array_mb, zero_mb)
    nbytes = sum(r.count_bytes() for r in msg.content.array_records.values())
    expect = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    msg_id = msg.object_id
    count = len(get_all_nested_objects(msg))
    rows = []
    tracemalloc.start()
    try:
        for name, impl in (("flower 1.42", flower), ("wire.flower_transfer", ours)):
            objects = dict(get_all_nested_objects(msg))
            pushed = []

            def upload(oid: str, content: bytes) -> None:
                time.sleep(latency_ms / 1000)
                pushed.append(oid)

            saved = iu.push_object_contents_from_iterable
            iu.push_object_contents_from_iterable = impl["push"]  # push_objects looks it up at each call
            try:
                push_extra, push_s = _peak_during(lambda: iu.push_objects(objects, upload))
            finally:
                iu.push_object_contents_from_iterable = saved
            assert len(pushed) == count, (len(pushed), count)
            # the pulled contents, owned by this dict alone (as pull_objects returns them): counted in the peak
            base, _ = tracemalloc.get_traced_memory()
            pulled = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
            holding, _ = tracemalloc.get_traced_memory()
            box = {}
            pull_extra, pull_s = _peak_during(lambda: box.setdefault("m", impl["pull"](msg_id, pulled)))
            pull_extra += holding - base
            got = box.pop("m")
            assert isinstance(got, Message) and not pulled
            for k, a in got.content["arrays"].items():
                assert np.array_equal(a.numpy(), expect[k]), k
            del got
            rows.append({"impl": name, "push_extra": push_extra, "push_s": push_s, "pull_extra": pull_extra,
                         "pull_s": pull_s})
    finally:
        tracemalloc.stop()
    return {"bytes": nbytes, "objects": count, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=1154.0, help="MB of random float32 (default: the paper UNet's 1154)")
    ap.add_argument("--array-mb", type=float, default=12.0, help="MB per array (default 12)")
    ap.add_argument("--zero-mb", type=float, default=20.0, help="MB of zeros in two equal arrays (default 20)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="upload time per object (default 20 ms)")
    a = ap.parse_args(argv)
    r = measure(a.mb, a.array_mb, a.zero_mb, a.latency_ms)
    n = r["bytes"]
    print(f"message: {n / MB:.0f} MB in {r['objects']} objects; upload {a.latency_ms:g} ms per object")
    print("| functions | push: extra MB | x message | s | pull: peak MB | x message | s |")
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['impl']} | {row['push_extra'] / MB:.0f} | {row['push_extra'] / n:.2f} | {row['push_s']:.1f} "
              f"| {row['pull_extra'] / MB:.0f} | {row['pull_extra'] / n:.2f} | {row['pull_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
