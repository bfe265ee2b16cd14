"""Whole slides in, tiles out (histodiff.slides): real slides from ../shared/data/slides and small pyramidal TIFFs
built from real tiles; every test skips cleanly when the shared data (or OpenSlide) is absent."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from histodiff.cli.tile_slides import main  # noqa: E402
from histodiff.data.slide_tiling import TilingParams, plan_grid, read_tile, tile_slides  # noqa: E402
from histodiff.data.slide_tissue import otsu_threshold  # noqa: E402

BAD = ("unreadable.svs", "unopenable.tiff")


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    if not (shared_data / "slides" / "cmu-1-small-region.svs").is_file():
        pytest.skip(f"sample slides not found at {shared_data / 'slides'}")
    return shared_data / "slides"


@pytest.fixture(scope="session")
def mosaic(shared_data: Path) -> np.ndarray:
    """1024 x 768 px at level 0: six real tumour tiles on the left half, glass (white) on the right half."""
    tiles = sorted((shared_data / "he-unlabeled" / "tia-tumour").glob("*.jpg"))[:6]
    if len(tiles) < 6:
        pytest.skip("he-unlabeled/tia-tumour tiles not found")
    canvas = np.full((768, 1024, 3), 255, np.uint8)
    for k, path in enumerate(tiles):
        row, col = divmod(k, 2)
        canvas[row * 256:(row + 1) * 256, col * 256:(col + 1) * 256] = np.asarray(Image.open(path).convert("RGB"))
    return canvas


def write_pyramid(path: Path, level0: np.ndarray, mpp: float | None, levels: int = 3) -> Path:
    """A tiled pyramidal TIFF (generic-tiff for OpenSlide): each level half the last; mpp in its resolution tags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(level0)
    with tifffile.TiffWriter(path) as tif:
        for i in range(levels):
            scaled = np.asarray(image.resize((level0.shape[1] >> i, level0.shape[0] >> i), Image.Resampling.BOX))
            extra = {} if mpp is None else {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(scaled, tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1 if i else 0,
                      **extra)
    return path


def manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def lines_naming(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if name in line]


# ---------------------------------------------------------------------------- the sample slides


def test_sample_slides_give_tissue_tiles_and_bad_ones_are_reported_in_one_line(slides_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--slides", str(slides_dir), "--out", str(out), "--tile-size", "16", "--limit-per-slide", "8"])
    err = capsys.readouterr().err
    assert rc == 0
    rows = manifest(out)
    assert {r["slide"] for r in rows} <= {"cmu-1-small-region", "small", "boxes", "boxes_dcm"}
    cmu = [r for r in rows if r["slide"] == "cmu-1-small-region"]
    assert len(cmu) == 8 and all(float(r["tissue"]) >= 0.5 and r["mpp"] == "0.5" for r in cmu)
    for r in cmu:
        tile = np.asarray(Image.open(out / r["path"]))
        assert tile.shape == (16, 16, 3) and tile.mean() < 225  # tissue, not glass
        assert r["path"] == f"cmu-1-small-region/cmu-1-small-region_x{r['x']}_y{r['y']}.png"
    done = json.loads((out / "cmu-1-small-region" / ".done.json").read_text())
    assert 0 < done["tissue_positions"] < done["positions"] / 2  # most of this slide is glass: skipped
    for name, reason in (("unreadable.svs", "Bogus marker length"), ("unopenable.tiff", "Unsupported TIFF")):
        [line] = lines_naming(err, name)
        assert "skipped" in line and reason in line
        assert not (out / Path(name).stem).exists()
    for name in ("small.svs", "boxes.tiff", "boxes_0.dcm"):  # opened: tiles, or one line saying why not
        assert any(r["slide"] == Path(name).stem for r in rows) or len(lines_naming(err, name)) == 1
    assert "boxes_1.dcm" not in err  # one DICOM slide of two files: reported once, by its first file


def test_small_svs_and_the_two_file_dicom_slide_are_read(slides_dir, tmp_path):
    src = tmp_path / "slides"
    src.mkdir()
    (src / "case7").mkdir(parents=True)
    for name in ("small.svs", "boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(slides_dir / name, src / name)
    for name in ("boxes_0.dcm", "boxes_1.dcm"):  # a DICOM slide as a folder of its files
        shutil.copy(slides_dir / name, src / "case7" / name)
    out = tmp_path / "out"
    summary = tile_slides(src, out, TilingParams(tile_size=8, min_tissue=0.0), progress=False)
    assert sorted(r.slide.name for r in summary.results) == ["boxes", "case7", "small"]  # boxes_0 + _1: one slide
    for name in ("boxes", "case7"):
        dicom = next(r for r in summary.results if r.slide.name == name)
        assert dicom.slide.vendor == "dicom" and len(dicom.slide.files) == 2
    assert all(r.tiles == 4 for r in summary.results)  # 16 x 16 px at 0.499 um/px: 2 x 2 tiles of 8 px
    assert {r["slide"] for r in manifest(out)} == {"boxes", "case7", "small"}


def test_only_bad_slides_exit_2_in_one_line(slides_dir, tmp_path, capsys):
    src = tmp_path / "slides"
    src.mkdir()
    for name in BAD:
        shutil.copy(slides_dir / name, src / name)
    assert main(["--slides", str(src), "--out", str(tmp_path / "out"), "--tile-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: none of the 2 slide(s)") and len(err) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "file", "no option"])
def test_no_slides_folder_exits_2_in_one_line(tmp_path, capsys, case):
    target = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "file": tmp_path / "a.txt"}.get(case)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("x")
    argv = ["--out", str(tmp_path / "out")] + ([] if target is None else ["--slides", str(target)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "slide" in err[0]


# ---------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("mpp, size, level, step, read", [
    (0.5, 64, 1, 128, 64),  # level 1 is exactly 0.5 um/px: read as is
    (1.0, 32, 2, 128, 32),
    (0.75, 64, 1, 192, 96),  # from the 0.5 um/px level, resized
    (0.25, 32, 0, 32, 32),
])
def test_tiles_come_from_the_level_with_the_target_resolution(mosaic, tmp_path, mpp, size, level, step, read):
    slide_path = write_pyramid(tmp_path / "slides" / "pyr.tiff", mosaic, mpp=0.25)
    out = tmp_path / "out"
    summary = tile_slides(slide_path.parent, out, TilingParams(mpp=mpp, tile_size=size), progress=False)
    assert summary.results[0].tiles > 0
    rows = manifest(out)
    assert {int(r["level"]) for r in rows} == {level} and {float(r["mpp"]) for r in rows} == {mpp}
    assert all(int(r["x"]) % step == 0 and int(r["y"]) % step == 0 for r in rows)
    assert all(int(r["x"]) + step / 2 <= 512 for r in rows)  # the glass half gives no tiles
    with openslide.OpenSlide(str(slide_path)) as slide:
        grid = plan_grid(slide.dimensions, slide.level_downsamples, (0.25, 0.25), TilingParams(mpp=mpp, tile_size=size))
        assert (grid.level, grid.step, grid.read) == (level, (step, step), (read, read))
        r = rows[len(rows) // 2]
        expected = np.asarray(read_tile(slide, grid, int(r["x"]), int(r["y"]), size))
    assert np.array_equal(np.asarray(Image.open(out / r["path"])), expected)


def test_a_slide_without_mpp_takes_the_documented_assumption(mosaic, tmp_path, capsys):
    write_pyramid(tmp_path / "slides" / "nompp.tiff", mosaic, mpp=None)
    out = tmp_path / "out"
    assert main(["--slides", str(tmp_path / "slides"), "--out", str(out), "--tile-size", "64"]) == 0
    [line] = lines_naming(capsys.readouterr().err, "no microns per pixel")
    assert "nompp.tiff" in line and "level 0 taken as the target 0.5 um/px" in line
    rows = manifest(out)
    assert rows and all(r["mpp"] == "" and r["level"] == "0" and int(r["x"]) % 64 == 0 for r in rows)

    assert main(["--slides", str(tmp_path / "slides"), "--out", str(out), "--tile-size", "64",
                 "--assume-mpp", "0.25"]) == 0
    assert "--assume-mpp" in lines_naming(capsys.readouterr().err, "no microns per pixel")[0]
    rows = manifest(out)
    assert rows and all(r["mpp"] == "0.5" and r["level"] == "1" and int(r["x"]) % 128 == 0 for r in rows)


def test_a_slide_coarser_than_the_target_is_reported(mosaic, tmp_path):
    write_pyramid(tmp_path / "slides" / "coarse.tiff", mosaic, mpp=2.0, levels=1)
    summary = tile_slides(tmp_path / "slides", tmp_path / "out", TilingParams(), progress=False)
    assert summary.results[0].status == "skipped" and "coarser than the target" in summary.results[0].reason


def test_otsu_separates_two_modes():
    values = np.concatenate([np.full(500, 10), np.full(300, 120)]).astype(np.uint8)
    assert 10 <= otsu_threshold(values) < 120


# ---------------------------------------------------------------------------- resuming, labels, client.run


def test_rerun_skips_finished_slides_and_redoes_a_half_done_one(mosaic, tmp_path, monkeypatch):
    import histodiff.data.slide_tiling as tiling

    src, out = tmp_path / "slides", tmp_path / "out"
    write_pyramid(src / "a.tiff", mosaic, mpp=0.25)
    write_pyramid(src / "b.tiff", mosaic[:, ::-1].copy(), mpp=0.25)
    params = TilingParams(tile_size=32, limit=5)
    calls = {"n": 0}
    real = tiling.read_tile

    def killed_in_b(slide, grid, x, y, size):
        calls["n"] += 1
        if calls["n"] == 8:  # the third tile of slide b
            raise KeyboardInterrupt
        return real(slide, grid, x, y, size)

    monkeypatch.setattr(tiling, "read_tile", killed_in_b)
    with pytest.raises(KeyboardInterrupt):
        tile_slides(src, out, params, progress=False)
    assert (out / "a" / ".done.json").is_file() and not (out / "b").exists()  # b is only a hidden partial
    first = {p.name: p.stat().st_mtime_ns for p in (out / "a").iterdir()}

    monkeypatch.setattr(tiling, "read_tile", real)
    summary = tile_slides(src, out, params, progress=False)
    assert [(r.slide.name, r.status, r.tiles) for r in summary.results] == [("a", "done", 5), ("b", "tiled", 5)]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "a").iterdir()} == first  # untouched
    assert not list(out.glob(".*partial")) and len(manifest(out)) == 10

    summary = tile_slides(src, out, TilingParams(tile_size=64, limit=3), progress=False)  # new parameters: redone
    assert [r.status for r in summary.results] == ["tiled", "tiled"]
    assert len(manifest(out)) == 6 and all(Image.open(out / r["path"]).size == (64, 64) for r in manifest(out))
    assert len(list((out / "a").glob("*.png"))) == 3


def test_labels_put_tiles_under_class_and_slide(mosaic, tmp_path, caplog):
    from histodiff.data import scan_tiles

    src, out = tmp_path / "slides", tmp_path / "out"
    for name in ("a", "b", "c"):
        write_pyramid(src / f"{name}.tiff", mosaic, mpp=0.25)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,class\na,TUM\nb.tiff,NORM\nzz,TUM\n")
    summary = tile_slides(src, out, TilingParams(tile_size=32, limit=4), labels_csv=labels, progress=False)
    assert [(r.slide.name, r.status) for r in summary.results] == [("a", "tiled"), ("b", "tiled"), ("c", "skipped")]
    assert "not in the labels CSV" in summary.results[2].reason
    assert any("names 1 slide(s) not found (first: zz)" in r.getMessage() for r in caplog.records)
    rows = manifest(out)
    assert {(r["slide"], r["label"]) for r in rows} == {("a", "TUM"), ("b", "NORM")}
    assert all(r["path"].startswith(f"{r['label']}/{r['slide']}/{r['slide']}_x") for r in rows)
    index = scan_tiles(out)  # the tile loader: class from the first folder, the slide folder below it
    assert index.classes == ["NORM", "TUM"] and index.labels_source == "folders" and len(index.entries) == 8
    # each tile's slide, from the manifest (the slide folder below the class says the same): splits keep slides whole
    assert index.groups_source == f"manifest:{(out / 'manifest.csv').resolve()}" and index.group_count() == 2
    assert all(g == PurePosixPath(rel).parts[1] for (rel, _), g in zip(index.entries, index.groups))


def test_client_run_with_slides_in_data_says_how_to_tile_them(slides_dir, tmp_path, capsys):
    from client.run import main as client_main

    data = tmp_path / "site0"
    data.mkdir()
    shutil.copy(slides_dir / "small.svs", data / "small.svs")
    rc = client_main(["--data", str(data), "--superlink", "127.0.0.1:1", "--insecure", "--work", str(tmp_path / "w")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m histodiff.slides --slides" in err[0] and f"--slides {data}" in err[0]


def test_client_run_tiles_slides_first(mosaic, tmp_path, monkeypatch):
    import client.run

    calls: list[list[str]] = []
    monkeypatch.setattr(client.run, "supervise", lambda cmd, *a, **k: calls.append(cmd) or 0)
    monkeypatch.setattr(client.run, "trusted_digests", lambda args: (["0" * 64], "test"))
    write_pyramid(tmp_path / "site0" / "a.tiff", mosaic, mpp=0.25)
    work = tmp_path / "work"
    assert client.run.main(["--slides", str(tmp_path / "site0"), "--superlink", "127.0.0.1:1", "--insecure",
                            "--work", str(work)]) == 0
    assert f'data-path="{work / "tiles"}"' in " ".join(calls[0])
    assert len(manifest(work / "tiles")) > 0 and (work / "tiles" / "a" / ".done.json").is_file()
