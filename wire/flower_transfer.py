"""Flower's object transfer without a second copy of the model: at most a few chunks deflated at once on a push, and
each chunk dropped as soon as the arrays made of it are whole on a pull.

Flower 1.42 moves a message as content-addressed objects (``Message`` -> ``RecordDict`` -> ``ArrayRecord`` ->
``Array`` -> 5 MB ``ArrayChunk``). Two of its functions hold the whole model twice while doing so (measured by
``python -m benchmarks.flower_transfer``, figures in docs/benchmarks.md):

- **push** (``inflatable_utils.push_object_contents_from_iterable``): it submits every object to its thread pool
  before the first upload ends. Submitting consumes the generator that deflates each object (an ``ArrayChunk``:
  a copy of its bytes with a header), so every chunk of the message is copied before most are sent: at paper size
  1.4 GB more in the ServerApp's DM push and 1.15 GB more in each site's reply. Here at most ``2 x workers``
  deflated objects exist at once; the same objects go to the same function, with the same number of threads.
- **pull** (``inflatable_utils.inflate_object_from_contents``): it keeps every inflated ``ArrayChunk`` in its memo
  until the whole message is built, so at the end the chunks and the arrays made of them are both in memory: at
  paper size 2.3 GB for a 1.15 GB reply in the ServerApp. Here a chunk is dropped when the last ``Array`` that is
  made of it is built (a chunk can be shared by several arrays: equal 5 MB pieces, such as zeros, are one object).

``install()`` puts both in place in the process that calls it (the ServerApp and the ClientApp import this module;
the SuperLink and SuperNode only store and forward contents). The objects, their ids, and what is pushed and pulled
do not change; a Flower other than 1.42's layout makes ``install()`` fail in one line. ``return_large_frees()``
(the ServerApp calls it) makes freed model-sized buffers leave the process instead of staying in glibc's heap.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
from collections import Counter
from typing import Callable, Iterable

_installed = False


def push_contents_bounded(object_contents: Iterable[tuple[str, bytes]], push_object_fn: Callable[[str, bytes], None],
                          *, max_concurrent_pushes: int | None = None, ahead: int = 2) -> None:
    """Push ``(object_id, content)`` pairs with ``push_object_fn`` on ``workers`` threads, taking the next pair from
    the iterable only while fewer than ``ahead x workers`` are submitted and not yet pushed. The first error stops
    the push and is raised (pairs not yet taken are never deflated)."""
    from flwr.supercore.constant import FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES
    from flwr.supercore.inflatable.inflatable_utils import get_num_workers

    workers = get_num_workers(FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES if max_concurrent_pushes is None
                              else max_concurrent_pushes)
    limit = max(1, ahead * workers)
    pool = cf.ThreadPoolExecutor(max_workers=workers)
    out: set[cf.Future] = set()
    try:
        for object_id, content in object_contents:
            if len(out) >= limit:
                done, out = cf.wait(out, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    future.result()  # raises the upload's error
            out.add(pool.submit(push_object_fn, object_id, content))
            del content
        for future in cf.as_completed(out):
            future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def inflate_releasing_chunks(object_id: str, object_contents: dict[str, bytes], *, keep_object_contents: bool = False,
                             objects: dict | None = None):
    """Build the object ``object_id`` from the pulled ``object_contents`` (which it empties, as Flower's does), with
    each ``ArrayChunk`` dropped once every ``Array`` made of it is built. With ``keep_object_contents`` or a memo
    ``objects`` given, Flower's own function does it."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    if keep_object_contents or objects is not None:
        flower = flowers_own()[1]
        if getattr(flower, "__name__", "") == "inflate_releasing_chunks":  # never call ourselves in a loop
            raise RuntimeError("wire.flower_transfer: Flower's own inflate_object_from_contents is not known here")
        return flower(object_id, object_contents, keep_object_contents=keep_object_contents, objects=objects)
    head = iu.get_object_head_values_from_object_content
    chunk = iu.ArrayChunk.__qualname__
    # how many arrays still need each chunk (an array's head lists each of its chunks once)
    needed: Counter = Counter()
    for content in object_contents.values():
        kind, children, _ = head(content)
        if kind == iu.Array.__qualname__:
            needed.update(children)
    built: dict[str, object] = {}

    def build(oid: str):
        if oid in built:
            return built[oid]
        content = object_contents.pop(oid)
        kind, child_ids, _ = head(content)
        children = {c: build(c) for c in child_ids}
        obj = iu.inflatable_class_registry[kind].inflate(content, children=children)
        del content
        for c in child_ids:
            if c in needed:
                needed[c] -= 1
                if needed[c] <= 0:
                    built.pop(c, None)
        children.clear()
        if kind != chunk or needed.get(oid, 0) > 0:
            built[oid] = obj
        return obj

    return build(object_id)


_ORIGINALS = "_histodiff_flower_originals"  # kept on Flower's module: a second copy of this one finds them too


def flowers_own():
    """Flower's own (push, pull) functions, installed over or not (for benchmarks, tests and the memo path)."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    return getattr(iu, _ORIGINALS, None) or (iu.push_object_contents_from_iterable, iu.inflate_object_from_contents)


def install() -> None:
    """Use the two functions above for every push and pull of this process. Idempotent. Raises ``RuntimeError``
    (one line) when the installed Flower does not have the functions where 1.42 has them.

    Flower's ``HttpGrid`` (the ServerApp's grid) imports the pull function by name: it is replaced there too when
    that module is loaded already (the ServerApp process loads it before the app), and a later import takes the
    replaced one from ``inflatable_utils``. A ClientApp never loads it (imports it does not need)."""
    global _installed
    if _installed:
        return
    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError as exc:
        raise RuntimeError(f"wire.flower_transfer: Flower's object transfer moved ({exc}); update "
                           "wire/flower_transfer.py") from None
    grid = sys.modules.get("flwr.superlink.grid.http_grid")
    targets = [(iu, "push_object_contents_from_iterable"), (iu, "inflate_object_from_contents")]
    targets += [(grid, "inflate_object_from_contents")] if grid is not None else []
    missing = [f"{m.__name__}.{name}" for m, name in targets if not callable(getattr(m, name, None))]
    missing += [f"{iu.__name__}.{name}" for name in ("get_object_head_values_from_object_content",
                                                      "inflatable_class_registry", "Array", "ArrayChunk",
                                                      "get_num_workers") if not hasattr(iu, name)]
    if missing:
        raise RuntimeError(f"wire.flower_transfer: this Flower lacks {', '.join(missing)} (laid out as in 1.42); "
                           "update wire/flower_transfer.py")
    if getattr(iu, _ORIGINALS, None) is None:  # the first install in this process keeps Flower's own
        setattr(iu, _ORIGINALS, (iu.push_object_contents_from_iterable, iu.inflate_object_from_contents))
    iu.push_object_contents_from_iterable = push_contents_bounded  # push_objects looks it up here at each call
    iu.inflate_object_from_contents = inflate_releasing_chunks  # the ClientApp's pull_and_inflate_object_from_tree
    if grid is not None:
        grid.inflate_object_from_contents = inflate_releasing_chunks  # the ServerApp's pull_messages
    _installed = True


def return_large_frees(threshold: int = 1 << 20) -> bool:
    """glibc only: serve every block of ``threshold`` bytes or more with its own mapping, given back to the system
    when freed. glibc's default threshold is dynamic: after the first large block is freed it rises (up to 32 MB),
    so the 5 MB chunks and the arrays of every later message come from the heap, and once freed they stay in the
    process (counted in its RSS) instead of going back. In a ServerApp that takes one model-sized reply after
    another that retention is a model or more (measured: docs/benchmarks.md). A fixed threshold turns the dynamic
    rule off. Returns False where there is no glibc ``mallopt`` (nothing changes there)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(threshold)) == 1 and mallopt(m_trim_threshold, int(threshold)) == 1)
