"""TensorBoard event files of a federated run, written by the coordinator as the run goes: ``<run_dir>/tensorboard/``.

``tensorboard --logdir RUN_DIR/tensorboard``. One step per global round (the ``global_round`` of the round's
``metrics.jsonl`` line); tags:

- ``loss/<phase>/<metric>``: the tile-weighted mean over the sites that answered (what the progress line prints;
  ``lr/<phase>/lr`` and ``time/<phase>/site-seconds``, the sites' local training time, beside it);
  ``site/<phase>/<metric>/<node>``: each site's own values
- ``bytes/sent_MB``, ``bytes/received_MB`` (all sites), ``bytes_site/sent_MB/<node>``, ``bytes_site/received_MB/<node>``
- ``time/round_s``, ``time/stage/<stage>`` (prepare, sites, aggregate, checkpoint, ...), ``time/secagg/<stage>``
- ``sites/asked``, ``sites/answered``, ``sites/dropped``, and the reasons as text (``dropped``)
- ``privacy/epsilon/<node>`` (local DP: what each site reported), ``privacy/central_epsilon``
- ``latent/scale_factor``, ``latent/mean``, ``latent/std`` (the latent-statistics round)
- ``table1/<node>/<setting>/<metric>`` (the labeled site's Table 1, from the deliver round)
- images: every entry of the line's ``images`` (``IMAGES_KEY``: tag -> PNG path relative to the run directory,
  or an absolute one) as ``<tag>``. Today the only images are the labeled site's real-vs-synthetic grids, where
  the coordinator can read them (simulation: ``sites/`` under the run directory); no site sends images over
  the wire (a site's outbox lets only scalar metrics leave it).

A resumed run opens a new event file in the same folder and writes only the rounds not written yet (the last one
written is kept in ``rounds_written.json``; rounds of ``metrics.jsonl`` after it are written first, so a crash
between the metrics line and its events loses nothing). A TensorBoard failure logs one warning and turns the
writer off for the rest of the run; it never breaks the run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("histodiff.fed")

BOARD_DIR = "tensorboard"
MARKER_FILE = "rounds_written.json"
IMAGES_KEY = "images"  # in a metrics.jsonl line: {tag: PNG path (relative to the run dir, or absolute)}
MB = 1e6


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def labeled_grids(roots: list[Path]) -> dict[str, str]:
    """The labeled sites' real-vs-synthetic grids readable under ``roots`` (``.../<site>/<run>/augment/grids/*.png``),
    as ``{"grids/<site>/<CLASS>": path}``."""
    found: dict[str, str] = {}
    for root in roots:
        if not Path(root).is_dir():
            continue
        for png in sorted(Path(root).rglob("grids/*.png")):
            parts = png.parts
            if "augment" not in parts:
                continue
            at = parts.index("augment")
            site = parts[at - 2] if at >= 2 else "site"
            found.setdefault(f"grids/{site}/{png.stem}", str(png))
    return found


class RunBoard:
    """The coordinator's TensorBoard writer; every method is safe to call whatever happens inside it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / BOARD_DIR
        self.writer = None
        self.failed = False
        self.last = 0  # the last global round written

    # ------------------------------------------------------------------ public, never raising

    def round(self, line: dict) -> None:
        """Write one committed round (its metrics.jsonl line), after any committed rounds not written yet."""
        self._safe(self._round, line)

    def close(self) -> None:
        if self.writer is not None:
            self._safe(self.writer.close)
            self.writer = None

    # ------------------------------------------------------------------ inside

    def _safe(self, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - TensorBoard never breaks the run
            self.failed = True
            log.warning("[fed] TensorBoard: %s: %s; no more event files in %s for this run (the run goes on)",
                        type(exc).__name__, str(exc)[:200], self.dir)
            try:
                if self.writer is not None:
                    self.writer.close()
            except Exception:  # noqa: BLE001
                pass
            self.writer = None

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir.mkdir(parents=True, exist_ok=True)
        self.last = self._written()
        self.writer = SummaryWriter(log_dir=str(self.dir))  # a new event file: earlier ones stay as they are

    def _written(self) -> int:
        """The last global round already in this folder's event files."""
        marker = self.dir / MARKER_FILE
        if marker.is_file():
            return int(json.loads(marker.read_text()).get("last_global_round", 0))
        events = sorted(self.dir.glob("events.out.tfevents.*"))
        if not events:
            return 0
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        return max((int(e.step) for path in events for e in EventFileLoader(str(path)).Load()), default=0)

    def _round(self, line: dict) -> None:
        if self.writer is None:
            self._open()
            from strategies.checkpoint import read_metrics

            for earlier in read_metrics(self.run_dir):  # committed rounds whose events were never written
                if self.last < int(earlier.get("global_round", 0)) < int(line.get("global_round", 0)):
                    self._write(earlier)
        step = int(line.get("global_round", 0))
        if step <= self.last:
            return
        self._write(line)
        self.writer.flush()
        self._mark(step)

    def _mark(self, step: int) -> None:
        self.last = step
        tmp = self.dir / (MARKER_FILE + ".tmp")
        tmp.write_text(json.dumps({"last_global_round": step}))
        os.replace(tmp, self.dir / MARKER_FILE)

    def _write(self, line: dict) -> None:
        w, step = self.writer, int(line.get("global_round", 0))
        phase = str(line.get("phase", "round"))

        def scalar(tag: str, value) -> None:
            value = _num(value)
            if value is not None:
                w.add_scalar(tag, value, step)

        def group(key: str) -> str:  # the sites' metrics: losses, and their learning rate and training time apart
            return "time" if "seconds" in key else "lr" if key == "lr" else "loss"

        for key, value in (line.get("losses") or {}).items():
            scalar(f"{group(key)}/{phase}/{key}", value)
        for node, values in (line.get("losses_per_site") or {}).items():
            for key, value in values.items():
                scalar(f"site/{phase}/{key}/{node}", value)
        scalar("bytes/sent_MB", (line.get("bytes_sent") or 0) / MB)
        scalar("bytes/received_MB", (line.get("bytes_received") or 0) / MB)
        for way in ("sent", "received"):
            for node, nbytes in (line.get(f"bytes_{way}_per_site") or {}).items():
                scalar(f"bytes_site/{way}_MB/{node}", (nbytes or 0) / MB)
        scalar("time/round_s", line.get("seconds"))
        for stage, seconds in (line.get("stages") or {}).items():
            scalar(f"time/stage/{stage}", seconds)
        for stage, seconds in ((line.get("secagg") or {}).get("seconds") or {}).items():
            scalar(f"time/secagg/{stage}", seconds)
        scalar("sites/asked", line.get("sites_asked"))
        scalar("sites/answered", line.get("sites_answered"))
        dropped = line.get("dropped") or {}
        scalar("sites/dropped", len(dropped))
        if dropped:
            w.add_text("dropped", "\n".join(f"- {phase} round {line.get('round')}: site {n}: {why}"
                                            for n, why in dropped.items()), step)
        for node, spent in (line.get("privacy") or {}).items():
            scalar(f"privacy/epsilon/{node}", (spent or {}).get("epsilon"))
        scalar("privacy/central_epsilon", (line.get("privacy_central") or {}).get("epsilon"))
        scalar("latent/scale_factor", line.get("scale_factor"))
        scalar("latent/mean", line.get("latent_mean"))
        scalar("latent/std", line.get("latent_std"))
        for node, result in (line.get("labeled_sites") or {}).items():
            for key, value in result.items():
                if "/" in str(key):  # "<setting>/<metric>": one cell of Table 1
                    scalar(f"table1/{node}/{key}", value)
        for tag, path in (line.get(IMAGES_KEY) or {}).items():
            self._image(tag, path, step)

    def _image(self, tag: str, path: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        file = Path(path) if Path(path).is_absolute() else self.run_dir / path
        if not file.is_file():
            return
        with Image.open(file) as img:
            self.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
