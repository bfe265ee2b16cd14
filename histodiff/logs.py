"""Console + file logging for entry points; a second call (another stage, same process) replaces the first."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_MARK = "_histodiff_handler"


def setup_logging(directory: Path, filename: str) -> None:
    """Log INFO and above to stdout and to ``directory/filename``."""
    directory.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    remove_handlers()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(directory / filename)):
        handler.setFormatter(fmt)
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def remove_handlers() -> None:
    """Detach and close the handlers ``setup_logging`` attached."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
        handler.close()
