"""Labels and groups of a tile folder: a labels CSV (``path,label[,group]``), the ``manifest.csv`` that
``python -m histodiff.slides`` writes (each tile's slide), and each entry's group (slide or patient).

Groups, first source that knows the tile wins: a ``group`` column of the labels CSV; the ``slide`` column of a
``manifest.csv`` at the folder's root; the folder right below the class folder (``<class>/<slide>/.../tile.png``).
A tile none of them knows is its own group. Groups are named, not namespaced by class: ``TUM/case7/`` and
``NORM/case7/`` are one slide, so its tiles stay on one side of a split."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from histodiff.data.images import first_line
from histodiff.errors import InputError

if TYPE_CHECKING:
    from histodiff.data.tile_index import TileIndex

log = logging.getLogger("histodiff.data")


def read_labels_csv(csv_path: Path, root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(relative tile path -> label, relative tile path -> group) from a ``path,label[,group]`` CSV; refuse missing
    files up front. The optional ``group`` column names the tile's slide or patient; an empty cell: unknown."""
    if not csv_path.is_file():
        raise InputError(f"labels CSV {csv_path} does not exist or is not a file")
    labels: dict[str, str] = {}
    groups: dict[str, str] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if "path" not in fields or "label" not in fields:
            raise InputError(f"labels CSV {csv_path} needs a header 'path,label', found {','.join(fields) or 'none'}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            rel, label = row["path"].replace("\\", "/"), row["label"]
            if not rel or not label:
                raise InputError(f"labels CSV {csv_path} line {line}: empty path or label")
            rel = os.path.normpath(rel).replace(os.sep, "/")
            # a path that names a place outside the root is an error; a symlink that leads out is skipped later
            if os.path.isabs(rel) or rel == ".." or rel.startswith("../"):
                raise InputError(f"labels CSV {csv_path} line {line}: path {rel} lies outside the data folder {root}")
            if labels.setdefault(rel, label) != label:
                raise InputError(f"labels CSV {csv_path} gives {rel} two labels ({labels[rel]}, {label})")
            group = row.get("group", "")
            if group and groups.setdefault(rel, group) != group:
                raise InputError(f"labels CSV {csv_path} gives {rel} two groups ({groups[rel]}, {group})")
    if not labels:
        raise InputError(f"labels CSV {csv_path} lists no tiles")
    missing = [rel for rel in labels if not (root / rel).is_file()]
    if missing:
        raise InputError(
            f"labels CSV {csv_path} names {len(missing)} file(s) missing under {root}, first: {missing[0]}"
        )
    return labels, groups


def read_slides_manifest(path: Path) -> dict[str, str]:
    """Relative tile path -> slide from a tiled-slides ``manifest.csv`` (columns ``slide,path,...``).

    Never fatal: a file of that name without those columns, or one that cannot be read, gives no groups (a warning
    says why); rows without a slide or with a path outside the folder are left out."""
    slides: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "slide" not in fields or "path" not in fields:
                log.warning("%s has no 'slide' and 'path' columns (not a tiled-slides manifest); its tiles' slides "
                            "are not known from it", path)
                return {}
            for row in reader:
                row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                rel, slide = row.get("path", "").replace("\\", "/"), row.get("slide", "")
                if not rel or not slide:
                    continue
                rel = os.path.normpath(rel).replace(os.sep, "/")
                if os.path.isabs(rel) or rel == ".." or rel.startswith("../"):
                    continue
                slides.setdefault(rel, slide)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        log.warning("cannot read the slides manifest %s (%s); its tiles' slides are not known from it", path,
                    first_line(exc))
        return {}
    return slides


def assign_groups(index: TileIndex, csv_groups: dict[str, str], labels_csv: str | Path | None,
                   manifest: Path) -> None:
    """Each entry's group: the CSV's ``group`` column, else the slides manifest's ``slide``, else (class folders)
    the folder right below the class folder, else None (its own group)."""
    slides = read_slides_manifest(manifest) if manifest.is_file() else {}
    from_folders = index.labels_source == "folders"
    groups: list[str | None] = []
    used: list[str] = []
    for rel, _ in index.entries:
        parts = PurePosixPath(rel).parts
        if rel in csv_groups:
            group, where = csv_groups[rel], f"csv:{Path(labels_csv).expanduser().resolve()}"
        elif rel in slides:
            group, where = slides[rel], f"manifest:{manifest}"
        elif from_folders and len(parts) >= 3:  # <class>/<slide>/.../tile.png
            group, where = parts[1], "folders"
        else:
            group, where = None, ""
        groups.append(group)
        if where and where not in used:
            used.append(where)
    index.groups = groups
    index.groups_source = "+".join(used) or "none"
