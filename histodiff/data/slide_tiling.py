"""Whole slides in, tiles out: tissue tiles at a target resolution from every slide OpenSlide reads.

Per slide: the tissue mask is an Otsu threshold on HSV saturation of a thumbnail; the tile grid is laid at the
target microns per pixel (``openslide.mpp-x/-y``) and read from the coarsest level that still has that
resolution, then resized to the tile size. A slide's tiles are written into a hidden folder that is renamed into
place with a ``.done.json`` marker once the slide is finished, so a rerun skips finished slides, redoes a
half-done one, and a killed run never leaves half a slide where the tile loader looks.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from histodiff.data.slide_sources import SlideSource, find_slides, label_of, openslide_module, read_slide_labels
from histodiff.data.slide_tissue import tissue_fractions, tissue_mask
from histodiff.data.slide_writing import MARKER, clear_other_copies, publish, read_marker, write_json, write_manifest
from histodiff.errors import InputError

TOLERANCE = 0.05  # a level (or level 0) up to 5% coarser than the target still counts as having its resolution
THUMBNAIL_SIZE = 2048  # longest side of the thumbnail the tissue mask is computed on
MIN_TILE = 8  # the tile loader's smallest usable side

log = logging.getLogger("histodiff.slides")


@dataclass(frozen=True)
class TilingParams:
    mpp: float = 0.5  # target microns per pixel of the tiles (the paper: 0.5)
    tile_size: int = 256  # tile side in pixels
    min_tissue: float = 0.5  # fraction of a tile that must be tissue
    limit: int | None = None  # at most this many tiles per slide, spread evenly over its tissue
    assume_mpp: float | None = None  # level-0 microns per pixel for slides that do not say

    def check(self) -> None:
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise InputError(f"--mpp must be a positive number, got {self.mpp}")
        if self.tile_size < MIN_TILE:
            raise InputError(f"--tile-size must be at least {MIN_TILE}, got {self.tile_size}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InputError(f"--min-tissue is a fraction from 0 to 1, got {self.min_tissue}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit-per-slide must be at least 1, got {self.limit}")
        if self.assume_mpp is not None and not (math.isfinite(self.assume_mpp) and self.assume_mpp > 0):
            raise InputError(f"--assume-mpp must be a positive number, got {self.assume_mpp}")


@dataclass
class SlideResult:
    slide: SlideSource
    status: str  # "tiled" (now), "done" (finished by an earlier run) or "skipped"
    tiles: int = 0
    reason: str = ""


@dataclass
class TilingSummary:
    slides_dir: Path
    out: Path
    results: list[SlideResult] = field(default_factory=list)

    @property
    def with_tiles(self) -> list[SlideResult]:
        return [r for r in self.results if r.tiles > 0]

    @property
    def skipped(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "skipped"]


class SlideSkipped(Exception):
    """A slide that gives no tiles; the message is the one-line reason."""


def describe(source: SlideSource) -> str:
    """The slide's file, for messages (with the count of the others of a DICOM set)."""
    more = len(source.files) - 1
    return f"{source.path} (and {more} more file(s) of this {source.vendor} slide)" if more else str(source.path)


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------- resolution


def slide_mpp(properties) -> tuple[float, float] | None:
    """Level-0 microns per pixel (x, y) from OpenSlide's properties; None when absent or not a positive number."""
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            v = float(properties.get(key, "nan"))
        except (TypeError, ValueError):
            v = float("nan")
        values.append(v if math.isfinite(v) and v > 0 else None)
    x, y = values[0] or values[1], values[1] or values[0]
    return (x, y) if x and y else None


@dataclass(frozen=True)
class Grid:
    level: int  # the level tiles are read from
    read: tuple[int, int]  # region read at that level (pixels), resized to the tile size
    step: tuple[int, int]  # tile footprint at level 0 (pixels); the grid's spacing
    cells: tuple[int, int]  # whole tiles across and down
    mpp: float | None  # the tiles' microns per pixel; None when the slide did not say and none was assumed


def plan_grid(dims: tuple[int, int], downsamples, mpp0: tuple[float, float] | None, p: TilingParams) -> Grid:
    """Where the tiles of a slide lie and which level they come from; SlideSkipped when it cannot give any."""
    base = mpp0 or ((p.assume_mpp,) * 2 if p.assume_mpp else (p.mpp, p.mpp))
    if max(base) > p.mpp * (1 + TOLERANCE):
        raise SlideSkipped(f"level 0 is {max(base):.4g} um/px, coarser than the target {p.mpp:g} um/px "
                           f"(its tiles would be upsampled; check the slide's resolution or pass a coarser --mpp)")
    footprint = (p.tile_size * p.mpp / base[0], p.tile_size * p.mpp / base[1])  # level-0 pixels
    step = (max(1, round(footprint[0])), max(1, round(footprint[1])))
    cells = (dims[0] // step[0], dims[1] // step[1])
    if min(cells) == 0:
        raise SlideSkipped(f"smaller than one tile ({dims[0]}x{dims[1]} px at level 0; a {p.tile_size} px tile at "
                           f"{p.mpp:g} um/px covers {step[0]}x{step[1]})")
    wanted = min(footprint) / p.tile_size  # the downsample that gives the target resolution
    level = max(i for i, d in enumerate(downsamples) if i == 0 or d <= wanted * (1 + TOLERANCE))
    d = downsamples[level]
    read = (max(1, round(footprint[0] / d)), max(1, round(footprint[1] / d)))
    known = mpp0 is not None or p.assume_mpp is not None
    return Grid(level, read, step, cells, p.mpp if known else None)


# ---------------------------------------------------------------------------- one slide


def pick_cells(fractions: np.ndarray, p: TilingParams) -> list[tuple[int, int, float]]:
    """(row, column, tissue fraction) of the cells with enough tissue; ``limit`` of them spread evenly."""
    rows, cols = np.nonzero(fractions >= p.min_tissue)
    cells = [(int(r), int(c), float(fractions[r, c])) for r, c in zip(rows, cols)]
    if p.limit is not None and len(cells) > p.limit:
        keep = np.unique(np.linspace(0, len(cells) - 1, p.limit).round().astype(int))
        cells = [cells[i] for i in keep]
    return cells


def read_tile(slide, grid: Grid, x: int, y: int, size: int) -> Image.Image:
    """The tile at level-0 (x, y): read at the grid's level, transparency on white, resized to size x size."""
    region = slide.read_region((x, y), grid.level, grid.read)
    tile = Image.new("RGB", region.size, (255, 255, 255))
    tile.paste(region, mask=region.getchannel("A"))
    if tile.size != (size, size):
        tile = tile.resize((size, size), Image.Resampling.LANCZOS)
    return tile


def _mpp_note(source: SlideSource, p: TilingParams) -> None:
    if p.assume_mpp is not None:
        log.warning("%s: no microns per pixel in the slide's metadata: level 0 taken as %g um/px (--assume-mpp)",
                    source.path, p.assume_mpp)
    else:
        log.warning("%s: no microns per pixel in the slide's metadata: level 0 taken as the target %g um/px; "
                    "manifest mpp left empty (pass --assume-mpp X to set it)", source.path, p.mpp)


def tile_slide(source: SlideSource, folder: Path, rel: str, p: TilingParams, disable: bool | None = True) -> dict:
    """Write ``source``'s tissue tiles into ``folder``; the done marker's content (SlideSkipped: none).

    ``rel``: the folder's path relative to the output root, for the manifest; ``disable``: tqdm's (the tile bar).
    """
    openslide = openslide_module()
    try:
        slide = openslide.OpenSlide(str(source.path))
    except Exception as exc:  # noqa: BLE001 - any failure to open is this slide's problem, reported in one line
        raise SlideSkipped(f"cannot be opened ({_why(exc)})") from None
    with slide:
        mpp0 = slide_mpp(slide.properties)
        grid = plan_grid(slide.dimensions, slide.level_downsamples, mpp0, p)
        if mpp0 is None:
            _mpp_note(source, p)
        try:
            mask = tissue_mask(slide.get_thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE)))
            fractions = tissue_fractions(mask, slide.dimensions, grid.step, grid.cells)
            cells = pick_cells(fractions, p)
            if not cells:
                raise SlideSkipped(f"no tissue: no tile position has {p.min_tissue:.0%} tissue or more "
                                   f"({fractions.size} looked at)")
            rows = []
            for r, c, frac in tqdm(cells, desc=source.name, unit="tile", leave=False, disable=disable):
                x, y = c * grid.step[0], r * grid.step[1]
                name = f"{source.name}_x{x}_y{y}.png"
                read_tile(slide, grid, x, y, p.tile_size).save(folder / name, format="PNG")
                rows.append([f"{rel}/{name}", grid.level, x, y, grid.mpp, round(frac, 4)])
        except SlideSkipped:
            raise
        except Exception as exc:  # noqa: BLE001 - a decoder failure skips this slide, never the run
            raise SlideSkipped(f"cannot be read ({_why(exc)})") from None
    return {"slide": source.name, "tiles": len(rows), "level": grid.level, "mpp_source":
            "slide" if mpp0 else "assumed" if p.assume_mpp else "none", "positions": int(fractions.size),
            "tissue_positions": int((fractions >= p.min_tissue).sum()), "rows": rows}


# ---------------------------------------------------------------------------- a folder of slides


def _identity(source: SlideSource, p: TilingParams, label: str | None) -> dict:
    """What a finished slide must match to be skipped: the parameters, its class and its files."""
    files = []
    for f in source.files:
        st = f.stat()
        files.append([f.name, st.st_size, st.st_mtime_ns])
    return {"params": asdict(p), "label": label, "files": files}


def _finished(final: Path, identity: dict) -> dict | None:
    marker = read_marker(final)
    return marker if marker is not None and marker.get("identity") == identity else None


def _one(source: SlideSource, out: Path, p: TilingParams, label: str | None, disable: bool | None) -> SlideResult:
    rel = f"{label}/{source.name}" if label else source.name
    final = out / rel
    identity = _identity(source, p, label)
    done = _finished(final, identity)
    if done is not None:
        return SlideResult(source, "done", int(done["tiles"]))
    partial = final.parent / f".{source.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a half-done slide from a killed run is redone
    partial.mkdir(parents=True)
    try:
        marker = tile_slide(source, partial, rel, p, disable)
    except SlideSkipped:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    marker["identity"] = identity
    marker["label"] = label
    write_json(partial / MARKER, marker)
    clear_other_copies(out, source.name, keep=final)
    publish(partial, final)
    return SlideResult(source, "tiled", marker["tiles"])


def tile_slides(slides_dir: str | Path, out: str | Path, p: TilingParams, labels_csv: str | Path | None = None,
                progress: bool | None = None) -> TilingSummary:
    """Tile every slide in ``slides_dir`` into ``out`` (see the module doc); skipped slides are logged in one line.

    ``progress``: None shows the bars on a terminal only, False hides them. Raises InputError for a bad folder,
    bad parameters or a bad labels CSV, never for a bad slide.
    """
    p.check()
    slides_dir, out = Path(slides_dir).expanduser(), Path(out).expanduser()
    if not slides_dir.is_dir():
        raise InputError(f"--slides {slides_dir} {'is not a folder' if slides_dir.exists() else 'does not exist'}")
    labels = read_slide_labels(labels_csv) if labels_csv is not None else None
    slides = find_slides(slides_dir, skip=(out,))
    if not slides:
        raise InputError(f"no slide files that OpenSlide can read in {slides_dir}")
    if labels is not None:
        _warn_unused_labels(labels, slides, labels_csv)
    out.mkdir(parents=True, exist_ok=True)
    summary = TilingSummary(slides_dir, out)
    disable = None if progress is None else not progress  # tqdm: None = bars on a terminal only
    for source in tqdm(slides, desc="slides", unit="slide", disable=disable):
        summary.results.append(_run_one(source, out, p, labels, labels_csv, disable))
    write_manifest(out, with_label=labels is not None)
    write_json(out / "tiling_report.json", _report(summary, p))
    return summary


def _run_one(source, out, p, labels, labels_csv, disable) -> SlideResult:
    label = label_of(source, labels) if labels is not None else None
    try:
        if labels is not None and label is None:
            raise SlideSkipped(f"not in the labels CSV {labels_csv}")
        return _one(source, out, p, label, disable)
    except SlideSkipped as exc:
        log.warning("skipped %s: %s", describe(source), exc)
        clear_other_copies(out, source.name, keep=None)  # tiles made with other parameters would mix in
        return SlideResult(source, "skipped", 0, str(exc))


def _warn_unused_labels(labels: dict[str, str], slides: list[SlideSource], csv_path) -> None:
    known = {k for s in slides for k in [s.name, *(f.name for f in s.files), *(f.stem for f in s.files)]}
    unused = sorted(k for k in labels if k not in known)
    if unused:
        log.warning("labels CSV %s names %d slide(s) not found (first: %s)", csv_path, len(unused), unused[0])


def _report(summary: TilingSummary, p: TilingParams) -> dict:
    return {
        "slides": str(summary.slides_dir), "params": asdict(p),
        "results": [{"slide": r.slide.name, "files": [str(f) for f in r.slide.files], "status": r.status,
                     "tiles": r.tiles, "reason": r.reason} for r in summary.results],
    }
