"""The tiled-slides folder on disk: atomic writes, finished-slide markers and the manifest built from them.

Layout: ``OUT/<slide>/<slide>_x<X>_y<Y>.png`` (or ``OUT/<class>/<slide>/...`` with labels), a ``.done.json``
marker in every finished slide's folder, and ``OUT/manifest.csv`` listing the tiles of every finished slide.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

MARKER = ".done.json"
MANIFEST = "manifest.csv"
COLUMNS = ["slide", "path", "level", "x", "y", "mpp", "tissue"]  # path: relative to OUT; x, y: level 0


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]


def finished_slides(out: Path) -> list[tuple[Path, dict]]:
    """(folder, marker) of every finished slide under ``out``: ``out/<slide>`` and ``out/<class>/<slide>``."""
    found = []
    for top in _visible_dirs(out):
        marker = read_marker(top)
        if marker is not None:
            found.append((top, marker))
            continue
        found += [(sub, m) for sub in _visible_dirs(top) if (m := read_marker(sub)) is not None]
    return found


def clear_other_copies(out: Path, name: str, keep: Path | None) -> None:
    """Remove finished copies of slide ``name`` in ``out`` but ``keep`` (made with other parameters or classes)."""
    for folder, marker in finished_slides(out):
        if marker.get("slide") == name and (keep is None or folder.resolve() != keep.resolve()):
            shutil.rmtree(folder, ignore_errors=True)


def publish(partial: Path, final: Path) -> None:
    """Put a finished slide's folder in place by renames only; an older version is moved aside, then removed."""
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(out: Path, with_label: bool) -> Path:
    """``out/manifest.csv`` from the markers of all finished slides (atomic); a ``label`` column when asked."""
    finished = finished_slides(out)
    with_label = with_label or any(m.get("label") for _, m in finished)
    path = out / MANIFEST
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS + (["label"] if with_label else []))
        for _, marker in sorted(finished, key=lambda fm: str(fm[1].get("slide"))):
            for rel, level, x, y, mpp, tissue in marker.get("rows", []):
                row = [marker.get("slide"), rel, level, x, y, "" if mpp is None else mpp, tissue]
                writer.writerow(row + ([marker.get("label") or ""] if with_label else []))
    os.replace(tmp, path)
    return path
