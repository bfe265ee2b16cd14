"""wire.flower_transfer: Flower's pushes deflate a few objects at a time, pulls drop chunks once their arrays are
built; the objects pushed and the message pulled are the same as with Flower's own functions."""

import threading
import time
import tracemalloc

import numpy as np
import pytest
from flwr.supercore.inflatable import inflatable_utils as iu
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.flower_transfer import build_message
from wire import flower_transfer

MB = 1024 ** 2


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Tracked:
    """An iterable of ``n`` (id, content) pairs that counts how many were taken and not yet uploaded."""

    def __init__(self, n: int, delay: float = 0.01):
        self.n, self.delay, self.out, self.most, self.taken = n, delay, 0, 0, 0
        self.pushed: list[str] = []
        self.lock = threading.Lock()

    def __iter__(self):
        for i in range(self.n):
            with self.lock:
                self.out += 1
                self.taken += 1
                self.most = max(self.most, self.out)
            yield f"id{i}", bytes(8)

    def upload(self, oid: str, content: bytes) -> None:
        time.sleep(self.delay)
        with self.lock:
            self.out -= 1
            self.pushed.append(oid)


def test_push_keeps_at_most_two_per_worker_deflated():
    src = Tracked(40)
    flower_transfer.push_contents_bounded(src, src.upload, max_concurrent_pushes=2)
    assert sorted(src.pushed) == sorted(f"id{i}" for i in range(40))  # each object once
    assert src.most <= 2 * 2 + 1  # submitted and not yet uploaded, + the one being taken
    flower = Tracked(40)
    flower_transfer.flowers_own()[0](flower, flower.upload, max_concurrent_pushes=2)
    assert flower.most > 2 * 2 + 1  # Flower's takes (deflates) every object before the uploads end


def test_push_error_stops_taking_and_is_raised():
    src = Tracked(100, delay=0.001)

    def upload(oid, content):
        src.upload(oid, content)
        if oid == "id3":
            raise ConnectionError("push session expired")

    with pytest.raises(ConnectionError, match="expired"):
        flower_transfer.push_contents_bounded(src, upload, max_concurrent_pushes=2)
    assert src.taken < 100  # the rest were never deflated


def _contents(msg):
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}


def test_pull_builds_the_same_message_and_empties_the_contents():
    msg = build_message(12, 2, 12)  # random arrays + two equal arrays of zeros: shared chunks
    msg_id = msg.object_id
    ours, theirs = _contents(msg), _contents(msg)
    shared = [oid for oid, c in ours.items() if c.startswith(b"ArrayChunk")]
    assert len(shared) < sum(len(a.slice_array()) for a in msg.content["arrays"].values())  # some chunks shared
    a = flower_transfer.inflate_releasing_chunks(msg_id, ours)
    b = flower_transfer.flowers_own()[1](msg_id, theirs)
    assert not ours and not theirs
    assert a.object_id == b.object_id == msg_id
    assert list(a.content["arrays"].keys()) == list(msg.content["arrays"].keys())
    for k, arr in msg.content["arrays"].items():
        np.testing.assert_array_equal(a.content["arrays"][k].numpy(), arr.numpy())


def test_pull_peak_is_about_one_message_not_two():
    """In a fresh process (as a ServerApp is), Flower's function and ours on the same pulled contents. tracemalloc
    counts bytes, not time: the same figures on any machine."""
    import json
    import subprocess
    import sys

    code = """
import json, tracemalloc
from flwr.supercore.inflatable import inflatable_utils as iu
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
from benchmarks.flower_transfer import build_message
from wire import flower_transfer
msg = build_message(40, 4, 0)
msg_id, size = msg.object_id, sum(r.count_bytes() for r in msg.content.array_records.values())
peaks = {}
tracemalloc.start()
for name, fn in (("flower", iu.inflate_object_from_contents), ("ours", flower_transfer.inflate_releasing_chunks)):
    base, _ = tracemalloc.get_traced_memory()
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    tracemalloc.reset_peak()
    built = fn(msg_id, contents)
    peaks[name] = (tracemalloc.get_traced_memory()[1] - base) / size
    del built, contents
print(json.dumps(peaks))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["flower"] > 1.8
    assert peaks["ours"] < 1.3


def test_install_puts_both_in_place_and_keeps_flowers_for_the_memo_path(monkeypatch):
    from flwr.superlink.grid import http_grid

    for module, name in ((iu, "push_object_contents_from_iterable"), (iu, "inflate_object_from_contents"),
                         (http_grid, "inflate_object_from_contents")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    push, original = flower_transfer.flowers_own()  # Flower's, whether or not an import installed ours already
    monkeypatch.setattr(flower_transfer, "_installed", False)
    monkeypatch.delattr(iu, flower_transfer._ORIGINALS, raising=False)  # as in a fresh process
    monkeypatch.setattr(iu, "push_object_contents_from_iterable", push)  # Flower's, as a fresh process has them
    monkeypatch.setattr(iu, "inflate_object_from_contents", original)
    from flwr.superlink.grid import http_grid as grid

    monkeypatch.setattr(grid, "inflate_object_from_contents", original)
    flower_transfer.install()
    flower_transfer.install()  # idempotent
    assert iu.push_object_contents_from_iterable is flower_transfer.push_contents_bounded
    assert http_grid.inflate_object_from_contents is flower_transfer.inflate_releasing_chunks
    assert flower_transfer.flowers_own() == (push, original)
    # push_objects (what the grid and the ClientApp call) now goes through the bounded push
    msg = build_message(6, 2, 0)
    objects, got = dict(get_all_nested_objects(msg)), {}
    iu.push_objects(objects, lambda oid, content: got.__setitem__(oid, content))
    assert set(got) == set(get_all_nested_objects(msg)) and not objects
    # a caller with its own memo gets Flower's function
    rebuilt = flower_transfer.inflate_releasing_chunks(msg.object_id, dict(got), keep_object_contents=True)
    assert rebuilt.object_id == msg.object_id


def test_a_clientapp_does_not_load_the_servers_grid():
    import subprocess
    import sys

    code = ("import sys; from wire import flower_transfer; flower_transfer.install(); "
            "print('flwr.superlink.grid.http_grid' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    # loaded after install(), the grid takes the replaced pull function
    code = ("from wire import flower_transfer; flower_transfer.install(); from flwr.superlink.grid import http_grid; "
            "print(http_grid.inflate_object_from_contents is flower_transfer.inflate_releasing_chunks)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_a_second_copy_of_the_module_keeps_flowers_own(monkeypatch):
    import importlib.util

    push, original = flower_transfer.flowers_own()
    flower_transfer.install()
    spec = importlib.util.spec_from_file_location("flower_transfer_copy", flower_transfer.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    for module, name in ((iu, "push_object_contents_from_iterable"), (iu, "inflate_object_from_contents")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    copy.install()
    assert copy.flowers_own() == (push, original)
    assert original is not flower_transfer.inflate_releasing_chunks and original is not copy.inflate_releasing_chunks


def test_install_fails_in_one_line_on_another_layout(monkeypatch):
    monkeypatch.setattr(flower_transfer, "_installed", False)
    monkeypatch.delattr(iu, "push_object_contents_from_iterable")
    with pytest.raises(RuntimeError, match="lacks .*push_object_contents_from_iterable"):
        flower_transfer.install()


def test_large_frees_go_back_to_the_system():
    """Two threads build 5 MB pieces (as a pull does) with small malloc'd objects between them; after three rounds
    of 200 MB freed, glibc's default keeps much of it; with return_large_frees() nothing stays."""
    import subprocess
    import sys

    code = """
import sys, concurrent.futures as cf
from wire import flower_transfer
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
ok = flower_transfer.return_large_frees() if sys.argv[1] == "1" else True
start, keep = rss(), []
def piece(i):
    keep.append(bytearray(4096))  # a small block after each piece: the heap cannot shrink past it
    return bytes(bytearray(5 << 20))
for _ in range(3):
    with cf.ThreadPoolExecutor(2) as ex:
        pieces = list(ex.map(piece, range(40)))
    del pieces
print(ok, (rss() - start) >> 20)
"""
    kept = {}
    for on in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, on], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        ok, grown = out.stdout.split()
        if ok != "True":
            pytest.skip("no glibc mallopt here")
        kept[on] = int(grown)
    assert kept["1"] < 20 < kept["0"], kept  # MB kept after three rounds of 200 MB
