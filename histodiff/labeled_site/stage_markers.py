"""Resumable stages: each finished stage leaves ``stages/<name>.json`` with a hash of what it depended on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("histodiff.augment")


def plain(value: Any) -> Any:
    """A JSON-able copy of a config node (or anything else json can take)."""
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def digest(*parts: Any) -> str:
    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def files_fingerprint(paths: list[Path]) -> str:
    """Names, sizes and mtimes: a cheap change detector for inputs (no file contents are read)."""
    items = []
    for p in paths:
        st = os.stat(p)
        items.append([str(p), st.st_size, st.st_mtime_ns])
    return digest(items)


class Stages:
    """Stage markers under ``out/stages``; a marker is written only after the stage's outputs are complete."""

    def __init__(self, out: Path) -> None:
        self.dir = Path(out) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def _path(self, name: str) -> Path:
        return self.dir / (name.replace("/", "__") + ".json")

    def done(self, name: str, key: str) -> dict[str, Any] | None:
        """The stored record when ``name`` finished with the same key, else None (the stage must run)."""
        try:
            record = json.loads(self._path(name).read_text())
        except (OSError, ValueError):
            return None
        if record.get("key") != key:
            log.info("stage %s: config or inputs changed, rerunning", name)
            return None
        log.info("stage %s: up to date, skipped", name)
        self.skipped.append(name)
        return record

    def mark(self, name: str, key: str, **info: Any) -> dict[str, Any]:
        record = {"key": key, **info}
        tmp = self._path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(self._path(name))
        self.ran.append(name)
        return record
