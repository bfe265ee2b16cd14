"""The verified index of a tile folder: walk it (symlinks, loops, unreadable entries), read labels from class
folders or a CSV, learn each tile's group (its slide or patient) where the data says it, check every image once,
and cache the index and its report in the site's work directory. Reading labels CSVs, slides manifests and
each tile's group (slide or patient) is ``tile_labels``."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from histodiff.data.images import IMAGE_EXTENSIONS, first_line, inspect_image
from histodiff.data.tile_labels import assign_groups, read_labels_csv
from histodiff.errors import InputError

INDEX_FILE = "tile_index.json"
REPORT_FILE = "tile_report.json"
SLIDES_MANIFEST = "manifest.csv"  # written by ``python -m histodiff.slides`` at its output folder's root
_INDEX_VERSION = 2  # 2: per-tile groups (slide or patient)

log = logging.getLogger("histodiff.data")


@dataclass
class TileIndex:
    root: Path
    entries: list[tuple[str, int]]  # (path relative to root, label index or -1)
    classes: list[str]  # sorted class names; [] when unlabeled
    skipped: list[tuple[str, str]]  # (path relative to root, reason)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per entry
    labels_source: str = "none"  # "csv:<path>", "folders" or "none"
    # per entry: its slide or patient, None when unknown (the tile is its own group); [] when never looked for
    groups: list[str | None] = field(default_factory=list)
    groups_source: str = "none"  # where the groups came from: "csv:<path>", "manifest:<path>", "folders", joined by "+"

    def class_counts(self) -> dict[str, int]:
        counts = {name: 0 for name in self.classes}
        for _, label in self.entries:
            if label >= 0:
                counts[self.classes[label]] += 1
        return counts

    def tile_groups(self) -> list[str | None]:
        """One group per entry (None: unknown, the tile is its own group)."""
        return list(self.groups) if len(self.groups) == len(self.entries) else [None] * len(self.entries)

    def group_count(self) -> int:
        """Known groups (slides or patients); tiles without one are not counted."""
        return len({g for g in self.tile_groups() if g is not None})


def _walk(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Tile files under root (relative POSIX paths, sorted) and the links that were not followed."""
    root_real = os.path.realpath(root)
    visited = {root_real}
    found: list[str] = []
    refused: list[tuple[str, str]] = []

    def inside(real: str) -> bool:
        return real == root_real or real.startswith(root_real + os.sep)

    def visit(folder: str, rel: str) -> None:
        try:
            items = sorted(os.scandir(folder), key=lambda d: d.name)
        except OSError as exc:
            refused.append((rel or ".", f"folder cannot be listed ({first_line(exc)})"))
            return
        for item in items:
            if item.name.startswith("."):
                continue
            item_rel = f"{rel}/{item.name}" if rel else item.name
            # one bad entry (a link loop, a dangling link, no permission) is listed, never fatal
            try:
                problem = _entry_problem(item)
                if problem is not None:
                    refused.append((item_rel, problem))
                    continue
                real = os.path.realpath(item.path)
                if item.is_symlink() and not inside(real):
                    if item.is_dir() or item.name.lower().endswith(IMAGE_EXTENSIONS):
                        refused.append((item_rel, "symlink leads outside the data folder; not followed"))
                    continue
                is_dir = item.is_dir()
                is_tile = not is_dir and item.name.lower().endswith(IMAGE_EXTENSIONS)
                if is_tile and not item.is_file():  # reading a FIFO would block, a device never end
                    refused.append((item_rel, "not a regular file (a FIFO, socket or device); skipped"))
                    continue
            except OSError as exc:
                refused.append((item_rel, f"filesystem error ({first_line(exc)}); skipped"))
                continue
            if is_dir:
                if real in visited:  # a link back into a folder already seen: a loop or a duplicate
                    continue
                visited.add(real)
                visit(item.path, item_rel)
            elif is_tile:
                found.append(item_rel)

    visit(str(root), "")
    return sorted(found), refused


def _entry_problem(item: os.DirEntry) -> str | None:
    """Why a folder entry cannot be followed (a symlink loop or a dangling link), or None."""
    if not item.is_symlink():
        return None
    try:
        os.stat(item.path)  # follows the link, as reading the tile would
    except FileNotFoundError:
        return "dangling symlink (its target does not exist); skipped"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop; not followed"
        return f"symlink cannot be followed ({first_line(exc)}); skipped"
    return None



def _file_stamp(path: Path) -> list[Any]:
    """Size and mtime of a file that may not exist (for the cache fingerprint)."""
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return []


def _fingerprint(root: Path, files: list[str], extra: list[Any]) -> str:
    """Cheap change detector: names, sizes and mtimes of the files, no image decoding."""
    digest = hashlib.sha1(json.dumps(extra).encode())
    for rel in files:
        try:
            st = os.stat(root / rel)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{rel}\0gone\n".encode())
    return f"{len(files)}-{digest.hexdigest()}"


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        if data.get("version") == _INDEX_VERSION and isinstance(data.get("indexes"), dict):
            return data
    except (OSError, ValueError):
        pass  # an unreadable cache is rebuilt, never an error
    return {"version": _INDEX_VERSION, "indexes": {}}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file


def scan_tiles(
    root: str | Path,
    labels_csv: str | Path | None = None,
    work_dir: str | Path | None = None,
    max_image_pixels: int = 100_000_000,
    labeled: bool | None = None,
    report_name: str = REPORT_FILE,
) -> TileIndex:
    """Build (or reuse from ``work_dir``) the verified index of the tiles under ``root``.

    ``labeled=None``: labels from the CSV if given, else from class sub-folders when every tile is in
    one, else unlabeled. ``labeled=True`` without a CSV demands sub-folders; ``False`` ignores labels.
    The report of what was skipped goes to ``work_dir/report_name``: one file per folder, so a caller
    scanning two folders with one work directory gives each its own name.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise InputError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"data path {root} is a file, expected a folder of tiles")
    root = root.resolve()
    if labels_csv is not None and labeled is False:
        raise InputError(f"labels CSV {labels_csv} given together with labeled=False for {root}")

    csv_labels: dict[str, str] | None = None
    csv_groups: dict[str, str] = {}
    if labels_csv is not None:
        csv_path = Path(labels_csv).expanduser().resolve()
        csv_labels, csv_groups = read_labels_csv(csv_path, root)
        files, refused = sorted(csv_labels), []
        source = f"csv:{csv_path}"
        st = csv_path.stat()
        extra: list[Any] = [source, st.st_size, st.st_mtime_ns]
    else:
        files, refused = _walk(root)
        source = "folders" if labeled is not False else "none"
        extra = [source]

    manifest = root / SLIDES_MANIFEST
    extra.append(["manifest", _file_stamp(manifest)])  # a new or changed slides manifest rebuilds the groups
    key = hashlib.sha1(json.dumps([str(root), source, labeled, max_image_pixels]).encode()).hexdigest()
    fingerprint = _fingerprint(root, files, [*extra, refused])  # a new link loop alone also rebuilds
    work = Path(work_dir).expanduser() if work_dir is not None else None
    cache = _load_cache(work / INDEX_FILE) if work is not None else None
    cached = cache["indexes"].get(key) if cache is not None else None

    if cached is not None and cached.get("fingerprint") == fingerprint:
        index = TileIndex(
            root=root,
            entries=[(rel, int(label)) for rel, label, _, _ in cached["entries"]],
            classes=list(cached["classes"]),
            skipped=[(rel, reason) for rel, reason in cached["skipped"]],
            sizes=[(int(w), int(h)) for _, _, w, h in cached["entries"]],
            labels_source=cached["labels_source"],
            groups=[None if g is None else str(g) for g in cached["groups"]],
            groups_source=cached["groups_source"],
        )
    else:
        index = _build(root, files, refused, csv_labels, source, labeled, max_image_pixels)
        assign_groups(index, csv_groups, labels_csv, manifest)
        if cache is not None and work is not None:
            cache["indexes"][key] = {
                "root": str(root),
                "labels_source": index.labels_source,
                "fingerprint": fingerprint,
                "classes": index.classes,
                "entries": [[rel, label, w, h] for (rel, label), (w, h) in zip(index.entries, index.sizes)],
                "skipped": [list(s) for s in index.skipped],
                "groups": index.groups,
                "groups_source": index.groups_source,
            }
            _write_json(work / INDEX_FILE, cache)

    report = work / report_name if work is not None else None
    if report is not None:
        _write_json(report, _report(index, len(files)))
    if index.skipped and index.entries:
        where = f"listed in {report}" if report is not None else f"first: {index.skipped[0][0]}: {index.skipped[0][1]}"
        log.warning("skipped %d of %d entries under %s (unreadable or not images, links out of the folder, "
                    "link loops); %s", len(index.skipped), len(files) + len(refused), root, where)
    if not index.entries:
        where = f"see {report}" if report is not None else "no work directory, so no report was written"
        if not files:
            raise InputError(f"no tiles ({' '.join(IMAGE_EXTENSIONS)}) found under {root}")
        first = index.skipped[0]
        raise InputError(
            f"no readable tile under {root}: {len(index.skipped)} file(s) skipped "
            f"(first: {first[0]}: {first[1]}); {where}"
        )
    return index


def _build(
    root: Path,
    files: list[str],
    refused: list[tuple[str, str]],
    csv_labels: dict[str, str] | None,
    source: str,
    labeled: bool | None,
    max_image_pixels: int,
) -> TileIndex:
    good: list[tuple[str, int, int]] = []
    skipped = list(refused)
    root_real = os.path.realpath(root)
    for rel in files:
        real = os.path.realpath(root / rel)
        if not real.startswith(root_real + os.sep):
            skipped.append((rel, "symlink leads outside the data folder; not followed"))
            continue
        result = inspect_image(root / rel, max_image_pixels)
        if isinstance(result, str):
            skipped.append((rel, result))
        else:
            good.append((rel, *result))

    if csv_labels is not None:
        names = [csv_labels[rel] for rel, _, _ in good]
    else:
        in_folder = [PurePosixPath(rel).parts for rel, _, _ in good]
        loose = [rel for rel, _, _ in good if len(PurePosixPath(rel).parts) == 1]
        if labeled is True and loose:
            raise InputError(
                f"labeled tiles must sit in class sub-folders of {root}, but {len(loose)} lie directly in it "
                f"(first: {loose[0]})"
            )
        use_folders = labeled is True or (labeled is None and bool(good) and not loose)
        names = [parts[0] for parts in in_folder] if use_folders else []
        source = "folders" if use_folders else "none"

    classes = sorted(set(names))
    lookup = {name: i for i, name in enumerate(classes)}
    entries = [(rel, lookup[names[i]] if names else -1) for i, (rel, _, _) in enumerate(good)]
    sizes = [(w, h) for _, w, h in good]
    return TileIndex(root=root, entries=entries, classes=classes, skipped=skipped, sizes=sizes,
                     labels_source=source)



def _report(index: TileIndex, n_files: int) -> dict[str, Any]:
    groups = index.tile_groups()
    return {
        "root": str(index.root),
        "labels": index.labels_source,
        "files_found": n_files,
        "tiles": len(index.entries),
        "skipped_count": len(index.skipped),
        "class_counts": index.class_counts(),
        # slides or patients: a validation split keeps each on one side; a tile without one is its own group
        "groups": index.group_count(),
        "groups_source": index.groups_source,
        "tiles_without_group": sum(g is None for g in groups),
        "skipped": [list(s) for s in index.skipped],
    }
