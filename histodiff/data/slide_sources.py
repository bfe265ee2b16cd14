"""Whole-slide images in a folder: which files OpenSlide reads, one entry per slide, and their class labels.

A slide is a file OpenSlide detects (SVS, NDPI, MRXS, SCN, generic tiled TIFF, ...) directly in the folder or in
one of its sub-folders. A DICOM slide is a set of files (one per level); files of one series become one slide,
named after their sub-folder, or after the files' common name when they lie loose in the folder.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from histodiff.errors import InputError

TILE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # never slides; .tif/.tiff can be either, OpenSlide decides


@dataclass(frozen=True)
class SlideSource:
    name: str  # unique in the folder: the slide's tile folder and tile file names
    path: Path  # the file OpenSlide opens
    files: tuple[Path, ...]  # every file of the slide (several for DICOM)
    vendor: str  # OpenSlide's format name


def openslide_module():
    """The ``openslide`` module, or an InputError saying how to install it."""
    try:
        import openslide
    except ImportError as exc:  # the wheel without its library, or neither installed
        raise InputError(f"reading slides needs OpenSlide: pip install openslide-python openslide-bin ({exc})") from None
    return openslide


def detect(path: Path) -> str | None:
    """OpenSlide's format name for ``path``, None when it is no slide (or cannot even be looked at)."""
    try:
        return openslide_module().OpenSlide.detect_format(str(path))
    except (OSError, ValueError):
        return None


def _files(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_file()]


def _subfolders(folder: Path, skip: set[Path]) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    dirs = [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]
    return [d for d in dirs if d.resolve() not in skip]


def find_slides(folder: str | Path, skip: tuple[str | Path, ...] = ()) -> list[SlideSource]:
    """The slides in ``folder`` and its direct sub-folders (hidden entries and ``skip`` folders left out)."""
    folder = Path(folder)
    skipped = {Path(s).resolve() for s in skip}
    found: list[SlideSource] = []
    for where, files in [(folder, _files(folder))] + [(d, _files(d)) for d in _subfolders(folder, skipped)]:
        dicom: list[Path] = []
        for path in files:
            if path.suffix.lower() in TILE_EXTENSIONS:
                continue
            vendor = detect(path)
            if vendor == "dicom":
                dicom.append(path)
            elif vendor is not None:
                found.append(SlideSource(path.stem, path, (path,), vendor))
        found += _dicom_slides(dicom, None if where == folder else where.name)
    return _unique(found)


def _series(path: Path) -> str:
    """The DICOM series a file belongs to (files OpenSlide cannot open form a series of their own)."""
    openslide = openslide_module()
    try:
        with openslide.OpenSlide(str(path)) as slide:
            props = slide.properties
            return props.get("dicom.SeriesInstanceUID") or props.get("openslide.quickhash-1") or str(path)
    except Exception:  # noqa: BLE001 - reported with its reason when the slide is opened for tiling
        return str(path)


def _dicom_slides(files: list[Path], folder_name: str | None) -> list[SlideSource]:
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(_series(path), []).append(path)
    slides = []
    for members in groups.values():
        name = folder_name or _common_name([p.stem for p in members])
        slides.append(SlideSource(name, members[0], tuple(members), "dicom"))
    return slides


def _common_name(stems: list[str]) -> str:
    """``boxes_0``, ``boxes_1`` -> ``boxes``; a single file keeps its stem."""
    if len(stems) == 1:
        return stems[0]
    prefix = os.path.commonprefix(stems).rstrip("_-. ")
    return prefix or stems[0]


def _unique(slides: list[SlideSource]) -> list[SlideSource]:
    """Give slides that share a name distinct ones: the format's extension, then a number, appended."""
    used: set[str] = set()
    out = []
    for s in slides:
        name, k = s.name, 2
        if name in used:
            name = f"{s.name}_{s.path.suffix.lstrip('.').lower() or s.vendor}"
        while name in used:
            name, k = f"{s.name}_{k}", k + 1
        used.add(name)
        out.append(SlideSource(name, s.path, s.files, s.vendor))
    return out


def slide_files_without_tiles(folder: str | Path) -> list[Path]:
    """Slide files under ``folder`` when it holds no tile images at all, else [] (a folder of tiles, or no
    OpenSlide installed to tell)."""
    try:
        openslide_module()
    except InputError:
        return []
    slides: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(root) / name
            if path.suffix.lower() in TILE_EXTENSIONS:
                return []
            if detect(path) is not None:
                slides.append(path)
            elif path.suffix.lower() in (".tif", ".tiff"):
                return []  # a plain TIFF tile
    return slides


# ---------------------------------------------------------------------------- labels


def read_slide_labels(csv_path: str | Path) -> dict[str, str]:
    """``slide,class`` rows (slide: a stem, a file name or a folder name) -> {slide: class}."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise InputError(f"labels CSV {path} does not exist or is not a file")
    labels: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [(f or "").strip().lower() for f in reader.fieldnames or []]
        column = "class" if "class" in fields else "label" if "label" in fields else None
        if "slide" not in fields or column is None:
            raise InputError(f"labels CSV {path} needs a header 'slide,class', found {','.join(fields) or 'none'}")
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            slide, label = row.get("slide", ""), row.get(column, "")
            if not slide or not label:
                raise InputError(f"labels CSV {path} line {line}: empty slide or class")
            if label in (".", "..") or label.startswith(".") or any(c in label for c in "/\\\0"):
                raise InputError(f"labels CSV {path} line {line}: class {label!r} cannot be a folder name")
            if labels.setdefault(slide, label) != label:
                raise InputError(f"labels CSV {path} gives slide {slide} two classes ({labels[slide]}, {label})")
    if not labels:
        raise InputError(f"labels CSV {path} lists no slides")
    return labels


def label_of(slide: SlideSource, labels: dict[str, str]) -> str | None:
    """The class the CSV gives ``slide``: by its name (a DICOM folder's name), a file's name or a file's stem."""
    keys = [slide.name]
    for f in slide.files:
        keys += [f.name, f.stem]
    return next((labels[k] for k in keys if k in labels), None)
