"""Report files: Table 1 (markdown + CSV), confusion-matrix PNGs, real-vs-synthetic grids per class."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

METRICS = ["accuracy", "f1", "sensitivity", "specificity"]
TABLE_COLUMNS = ["setting", "row", "n_synthetic", "fid", "kid", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
                 "seeds", "quota_met"]


def row_label(setting: str) -> str:
    if setting == "baseline":
        return "baseline, real only"
    kind, pct = setting.rsplit("_", 1)
    return f"+ {kind} {pct}%"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def table_rows(results: dict) -> list[dict]:
    rows = []
    for setting, res in results["settings"].items():
        runs = list(res["seeds"].values())
        row = {"setting": setting, "row": row_label(setting), "n_synthetic": res.get("n_synthetic", 0),
               "fid": res.get("fid"), "kid": res.get("kid"), "seeds": ";".join(res["seeds"]),
               "quota_met": res.get("quota_met", True)}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([r[m] for r in runs])
        rows.append(row)
    return rows


def write_tables(rows: list[dict], out: Path, several_seeds: bool) -> None:
    with open(out / "table1.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    lines = ["| setting | FID | accuracy | F1 | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for r in rows:
        fid = "-" if r["fid"] is None else f"{r['fid']:.3f}"
        cells = [f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}" if several_seeds else f"{r[m + '_mean']:.3f}"
                 for m in METRICS]
        flag = "" if r["quota_met"] else " (quota not met)"
        lines.append(f"| {r['row']}{flag} | {fid} | " + " | ".join(cells) + " |")
    (out / "table1.md").write_text("\n".join(lines) + "\n")


def confusion_png(confusion: list[list[int]], classes: list[str], title: str, path: Path, cell: int = 34) -> Path:
    """Row-normalised shading, counts in the cells; rows are true classes, columns predictions."""
    n = len(classes)
    left, top = 60, 40
    img = Image.new("RGB", (left + n * cell + 10, top + n * cell + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((5, 5), title, fill="black")
    for i in range(n):
        total = max(1, sum(confusion[i]))
        draw.text((5, top + i * cell + cell // 3), classes[i][:7], fill="black")
        draw.text((left + i * cell + 2, top + n * cell + 8), classes[i][:5], fill="black")
        for j in range(n):
            v = confusion[i][j]
            shade = int(255 - 200 * v / total)
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((box[0] + 4, box[1] + cell // 3), str(v), fill="black" if shade > 120 else "white")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def class_grid(real: torch.Tensor, synthetic: torch.Tensor, n: int, path: Path, title: str | None = None) -> Path:
    """Top row real tiles, bottom row synthetic ones (blank where fewer than ``n`` exist), each row labelled
    "real" / "synthetic" in the image (``histodiff.evaluation.watch.labelled_grid``)."""
    from histodiff.evaluation.watch import labelled_grid

    labelled_grid([("real", real[:n]), ("synthetic", synthetic[:n])], path, title=title, ncol=max(1, n))
    return Path(path)


def class_grids(labeled, cand, selections, classes: list[str], n: int, size: int, out: Path) -> None:
    """``out/<class>.png`` per class: real tiles on top, the largest selection's synthetic tiles below (or any
    candidates of the class when no selection kept one)."""
    shown = max(selections, key=lambda s: len(s.indices)).indices if selections else []
    entries = labeled.index.entries
    for c, name in enumerate(classes):
        real = [labeled[i][0] for i in [i for i, e in enumerate(entries) if e[1] == c][:n]]
        picks = [i for i in shown if cand.index.entries[i][1] == c] or \
                [i for i in range(len(cand)) if cand.index.entries[i][1] == c]
        syn = [cand[i][0] for i in picks[:n]]
        empty = torch.empty(0, 3, size, size)
        class_grid(torch.stack(real) if real else empty, torch.stack(syn) if syn else empty, n, out / f"{name}.png",
                   title=name)
