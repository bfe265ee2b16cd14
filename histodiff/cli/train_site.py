"""Single-site (centralised) training: ``python -m histodiff.train stage=lae|dm|sample data=DIR [overrides]``.

Progress bars, checkpoints in diffusers layout under ``run_dir``, CSV + TensorBoard logs, and resume:
rerunning the same command continues from the last checkpoint up to ``train.steps``.
The stages themselves are ``histodiff.local_training.single_site``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from histodiff.config import ConfigError, compose, main_guard, to_yaml
from histodiff.local_training.single_site import STAGES
from histodiff.logs import setup_logging

log = logging.getLogger("histodiff.train")


@main_guard
def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments are key=value overrides, got {bad[0]!r}")
    cfg = compose(argv)
    run_dir = Path(cfg.run_dir)
    setup_logging(run_dir, "train.log")
    (run_dir / f"config.{cfg.stage}.yaml").write_text(to_yaml(cfg))
    log.info("stage %s, profile %s, run_dir %s", cfg.stage, cfg.profile, run_dir)
    STAGES[cfg.stage](cfg, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
