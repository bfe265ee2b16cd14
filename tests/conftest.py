"""Shared pytest fixtures: small phantom tile folders and the optional real sample data."""

from __future__ import annotations

from pathlib import Path

import pytest

# ../shared next to the repository holds real H&E samples; a fresh clone does not have it
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample tiles (see shared/data/README.md); the test is skipped when they are absent."""
    if not (SHARED_DATA / "crc-val-he-32").is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labeled phantom site: 3 tiles of each of the nine classes, 32 px, site 0."""
    from histodiff.data.phantom_tissue import write_phantom_site

    return write_phantom_site(tmp_path_factory.mktemp("phantom") / "site0", per_class=3, size=32, site=0, seed=0)


@pytest.fixture(scope="session")
def phantom_unlabeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unlabeled phantom site: 4 tiles of each class, 32 px, flat folder (pre-training data)."""
    from histodiff.data.phantom_tissue import write_phantom_site

    return write_phantom_site(tmp_path_factory.mktemp("phantom") / "unlabeled", per_class=4, size=32, site=0,
                              seed=0, labeled=False)


@pytest.fixture(scope="session")
def phantom_tiles(phantom_unlabeled: Path, tmp_path_factory: pytest.TempPathFactory):
    """``phantom_unlabeled`` as a training TileFolder (flips/rotations on)."""
    from histodiff.data import TileFolder, TileOptions

    return TileFolder.open(phantom_unlabeled, TileOptions(32, augment=True), work_dir=tmp_path_factory.mktemp("work"))


@pytest.fixture(autouse=True)
def _drop_entry_point_log_handlers():
    """Entry points called in-process attach handlers to pytest's captured stdout: detach them after each test."""
    yield
    from histodiff.logs import remove_handlers

    remove_handlers()
