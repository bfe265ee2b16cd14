"""Which virtual site of a simulation is labeled: the project's default run config picks the last partition."""

from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: tomli comes with flwr
    import tomli as tomllib

from client.task import site_from_context

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
DEFAULTS = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]  # what `flwr run` starts from


def _roles(run_config: dict, n: int = 4) -> list[str]:
    # the node config Flower's simulation gives each virtual SuperNode
    return [site_from_context({"partition-id": i, "num-partitions": n}, run_config).role for i in range(n)]


def test_default_run_config_makes_the_last_partition_labeled(tmp_path):
    rc = dict(DEFAULTS, **{"run-dir": str(tmp_path / "run")})
    assert DEFAULTS["labeled-partitions"] == "last"
    assert _roles(rc) == ["unlabeled", "unlabeled", "unlabeled", "labeled"]
    assert _roles(rc, 6) == ["unlabeled"] * 5 + ["labeled"]
    labeled = site_from_context({"partition-id": 3, "num-partitions": 4}, rc)
    # no sites-root: phantom tiles in the site's own stain style, with a held-out test set of its own
    assert labeled.name == "site3" and labeled.phantom == 3
    assert labeled.data == tmp_path / "run" / "sites" / "site3" / "phantom-tiles"
    assert labeled.test == tmp_path / "run" / "sites" / "site3" / "phantom-test"
    # Flower's legacy simulation passes the ids as strings
    assert site_from_context({"partition-id": "3", "num-partitions": "4"}, rc).role == "labeled"


@pytest.mark.parametrize("value, labeled", [("3", [3]), ("1,3", [1, 3]), ("0 last", [0, 3]), ("", []), ("  ", [])])
def test_explicit_labeled_partitions(tmp_path, value, labeled):
    rc = dict(DEFAULTS, **{"run-dir": str(tmp_path / "run"), "labeled-partitions": value})
    assert [i for i, role in enumerate(_roles(rc)) if role == "labeled"] == labeled


def test_sites_root_folders(tmp_path):
    root = tmp_path / "root"
    for name in ("site0", "site3", "site3-test"):
        (root / name).mkdir(parents=True)
    rc = dict(DEFAULTS, **{"run-dir": str(tmp_path / "run"), "sites-root": str(root)})
    labeled = site_from_context({"partition-id": 3, "num-partitions": 4}, rc)
    assert (labeled.role, labeled.data, labeled.test) == ("labeled", root / "site3", root / "site3-test")
    assert labeled.phantom is None  # real folders: no phantom tiles are generated
    unlabeled = site_from_context({"partition-id": 0, "num-partitions": 4}, rc)
    assert (unlabeled.role, unlabeled.data, unlabeled.test) == ("unlabeled", root / "site0", None)
    (root / "site3-test").rmdir()  # no siteN-test/: the labeled site stores the delivered model only
    assert site_from_context({"partition-id": 3, "num-partitions": 4}, rc).test is None


def test_bad_labeled_partitions_are_one_line_errors(tmp_path):
    rc = dict(DEFAULTS, **{"run-dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match="needs num-partitions"):  # "last" outside Flower's simulation
        site_from_context({"partition-id": 0}, rc)
    for bad in ("first", "-1", "2.5"):
        with pytest.raises(ValueError, match="expected partition ids") as err:
            site_from_context({"partition-id": 0, "num-partitions": 4}, dict(rc, **{"labeled-partitions": bad}))
        assert "\n" not in str(err.value)
