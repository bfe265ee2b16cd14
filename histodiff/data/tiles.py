"""Tile folders: a verified, cached index of H&E tiles and a torch Dataset that serves them in [-1, 1].

Every image is checked once when the index is built; the index is cached in the site's work directory.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from histodiff.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MIN_SIDE = 8  # below this an image has no tissue structure left to learn from
INDEX_FILE = "tile_index.json"
REPORT_FILE = "tile_report.json"
_INDEX_VERSION = 1

log = logging.getLogger("histodiff.data")
_ANNOUNCED: set[tuple[str, int]] = set()  # (folder, size) whose resize was already stated in this process


@dataclass
class TileIndex:
    root: Path
    entries: list[tuple[str, int]]  # (path relative to root, label index or -1)
    classes: list[str]  # sorted class names; [] when unlabeled
    skipped: list[tuple[str, str]]  # (path relative to root, reason)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per entry
    labels_source: str = "none"  # "csv:<path>", "folders" or "none"

    def class_counts(self) -> dict[str, int]:
        counts = {name: 0 for name in self.classes}
        for _, label in self.entries:
            if label >= 0:
                counts[self.classes[label]] += 1
        return counts


# ---------------------------------------------------------------------------- image reading


@contextmanager
def _pixel_limit(max_image_pixels: int) -> Iterator[None]:
    """Apply our own decompression-bomb limit for one read, and put PIL's global limit back after."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; a warning is still a refusal for us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a decompression bomb ({_first_line(exc)})"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL can identify"
    return f"unreadable ({type(exc).__name__}: {_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _inspect(path: Path, max_image_pixels: int) -> tuple[int, int] | str:
    """Open and fully check one image; (width, height) when usable, else the reason it is not."""
    try:
        with _pixel_limit(max_image_pixels):
            with Image.open(path) as im:
                im.verify()  # structure and checksums (PNG CRCs) without decoding
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_image_pixels:
                    return f"refused as a decompression bomb ({w}x{h} pixels > max_image_pixels {max_image_pixels})"
                if min(w, h) < MIN_SIDE:
                    return f"too small ({w}x{h}; at least {MIN_SIDE} px a side needed)"
                if im.format == "JPEG":
                    # DCT-scaled decode still reads the whole stream (catches truncation) at 1/8 the cost
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
                _to_rgb(im)  # refuses modes we cannot turn into RGB
                return (w, h)
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party decoder means "skip this file"
        return _reason(exc)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any common PIL mode to 8-bit RGB; transparency is composited on white (empty glass)."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8_grey(np.asarray(im))).convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    raise ValueError(f"unsupported image mode {mode}")


def _to_uint8_grey(a: np.ndarray) -> np.ndarray:
    """Scale 16-bit, 32-bit or float greyscale to 8 bits by its value range, never by clipping."""
    is_float, is_16bit = a.dtype.kind == "f", a.dtype.itemsize == 2
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if is_float and lo >= 0 and hi <= 1.0:
        scaled = a * 255.0
    elif is_float and lo >= 0 and hi <= 255.0:
        scaled = a
    elif is_16bit or (not is_float and lo >= 0 and hi <= 65535):
        scaled = a / 257.0  # the full 16-bit range onto 0..255, as 65535 / 257 == 255
    else:
        scaled = (a - lo) / max(hi - lo, 1e-12) * 255.0  # data of unknown range
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _load_square(path: Path, size: int, max_image_pixels: int) -> np.ndarray:
    """Read one tile as uint8 size x size x 3: shorter side to ``size`` (bicubic), centre crop."""
    with _pixel_limit(max_image_pixels):
        with Image.open(path) as im:
            w, h = im.size
            if im.format == "JPEG" and min(w, h) > 2 * size:
                im.draft("RGB", (w * size // min(w, h), h * size // min(w, h)))  # decode big JPEGs reduced
                w, h = im.size
            im = _to_rgb(im)
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            # resizing only the central square equals resize-then-centre-crop, without the waste
            out = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                            reducing_gap=3.0 if side > 3 * size else None)
            return np.asarray(out, dtype=np.uint8)


# ---------------------------------------------------------------------------- scanning


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
            refused.append((rel or ".", f"folder cannot be listed ({_first_line(exc)})"))
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
                refused.append((item_rel, f"filesystem error ({_first_line(exc)}); skipped"))
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
        return f"symlink cannot be followed ({_first_line(exc)}); skipped"
    return None


def _read_csv(csv_path: Path, root: Path) -> dict[str, str]:
    """Map relative tile path -> label from a ``path,label`` CSV; refuse missing files up front."""
    if not csv_path.is_file():
        raise InputError(f"labels CSV {csv_path} does not exist or is not a file")
    labels: dict[str, str] = {}
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
    if not labels:
        raise InputError(f"labels CSV {csv_path} lists no tiles")
    missing = [rel for rel in labels if not (root / rel).is_file()]
    if missing:
        raise InputError(
            f"labels CSV {csv_path} names {len(missing)} file(s) missing under {root}, first: {missing[0]}"
        )
    return labels


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
    if labels_csv is not None:
        csv_path = Path(labels_csv).expanduser().resolve()
        csv_labels = _read_csv(csv_path, root)
        files, refused = sorted(csv_labels), []
        source = f"csv:{csv_path}"
        st = csv_path.stat()
        extra: list[Any] = [source, st.st_size, st.st_mtime_ns]
    else:
        files, refused = _walk(root)
        source = "folders" if labeled is not False else "none"
        extra = [source]

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
        )
    else:
        index = _build(root, files, refused, csv_labels, source, labeled, max_image_pixels)
        if cache is not None and work is not None:
            cache["indexes"][key] = {
                "root": str(root),
                "labels_source": index.labels_source,
                "fingerprint": fingerprint,
                "classes": index.classes,
                "entries": [[rel, label, w, h] for (rel, label), (w, h) in zip(index.entries, index.sizes)],
                "skipped": [list(s) for s in index.skipped],
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
        result = _inspect(root / rel, max_image_pixels)
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
    return {
        "root": str(index.root),
        "labels": index.labels_source,
        "files_found": n_files,
        "tiles": len(index.entries),
        "skipped_count": len(index.skipped),
        "class_counts": index.class_counts(),
        "skipped": [list(s) for s in index.skipped],
    }


# ---------------------------------------------------------------------------- dataset


class TileFolder(torch.utils.data.Dataset):
    """Tiles as float32 3 x S x S tensors in [-1, 1] with their label (-1 when unlabeled)."""

    def __init__(
        self,
        root: str | Path | None,
        image_size: int,
        labels_csv: str | Path | None = None,
        work_dir: str | Path | None = None,
        train: bool = False,
        max_image_pixels: int = 100_000_000,
        labeled: bool | None = None,
        index: TileIndex | None = None,
        subset: list[int] | None = None,
        augment: bool | None = None,
        report_name: str = REPORT_FILE,
    ) -> None:
        if image_size <= 0:
            raise InputError(f"image_size must be positive, got {image_size}")
        if index is None:
            if root is None:
                raise InputError("TileFolder needs a data folder or a prebuilt index")
            index = scan_tiles(root, labels_csv, work_dir, max_image_pixels, labeled, report_name)
            _announce_resize(index, image_size)
        self.index = index
        self.classes = index.classes
        self.image_size = image_size
        self.max_image_pixels = max_image_pixels
        # tissue has no orientation, so the 8 flips/rotations are free augmentation in training
        self.augment = train if augment is None else augment
        self.positions = list(range(len(index.entries))) if subset is None else list(subset)
        bad = [i for i in self.positions if not 0 <= i < len(index.entries)]
        if bad:
            raise InputError(f"subset index {bad[0]} is out of range for {len(index.entries)} tiles in {index.root}")

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def labels(self) -> list[int]:
        return [self.index.entries[i][1] for i in self.positions]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.index.entries[self.positions[i]]
        path = self.index.root / rel
        try:
            pixels = _load_square(path, self.image_size, self.max_image_pixels)
        except Exception as exc:  # noqa: BLE001 - name the file instead of a bare decoder traceback
            raise InputError(
                f"tile {path} can no longer be read ({_reason(exc)}); it changed after indexing, rerun to re-index"
            ) from None
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        if self.augment:
            # torch's RNG, so DataLoader workers get distinct, seedable streams
            k = int(torch.randint(0, 4, ()).item())
            if k:
                x = torch.rot90(x, k, dims=(1, 2))
            if torch.rand(()) < 0.5:
                x = torch.flip(x, dims=(2,))
        return x.contiguous(), label


def _announce_resize(index: TileIndex, image_size: int) -> None:
    """State once per folder (and process) that its tiles are served at another size than they have."""
    other = Counter(wh for wh in index.sizes if wh != (image_size, image_size))
    key = (str(index.root), image_size)
    if not other or key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    sizes = ", ".join(f"{w}x{h} px ({n})" for (w, h), n in other.most_common(3))
    more = f" and {len(other) - 3} other size(s)" if len(other) > 3 else ""
    log.info("%d of %d tiles under %s are %s%s: resized (shorter side) and centre-cropped to %dx%d px "
             "(tiles.image_size)", sum(other.values()), len(index.sizes), index.root, sizes, more, image_size,
             image_size)


def tile_dataset_from_config(cfg: Any, train: bool = True, data: str | Path | None = None,
                             labels: str | Path | None = None) -> TileFolder:
    """The TileFolder a config describes: ``cfg.data``/``cfg.labels`` unless given, ``cfg.tiles.*``."""
    data = data if data is not None else cfg.data
    labels = labels if labels is not None else cfg.labels
    if data is None:
        raise InputError("no data folder given (set data=DIR)")
    work_dir = cfg.work_dir or cfg.run_dir
    tiles = cfg.tiles
    return TileFolder(
        data,
        tiles.image_size,
        labels_csv=labels,
        work_dir=work_dir,
        train=train,
        max_image_pixels=tiles.max_image_pixels,
        augment=bool(train and tiles.random_flip),
    )


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """Invert the [-1, 1] normalisation: 3 x H x W tensor -> H x W x 3 uint8 array."""
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a 3 x H x W tensor, got shape {tuple(x.shape)}")
    x = x.detach().float().cpu().clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
