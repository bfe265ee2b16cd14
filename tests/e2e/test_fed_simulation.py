"""The same schedule in Flower's simulation runtime (``flwr run`` with num-supernodes), phantom site per partition."""

import json
import subprocess
import sys

import pytest

from strategies.checkpoint import read_metrics
from strategies.schedule import load_state
from tests.e2e.loopback import OVERRIDES, REPO

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(400)
def test_simulation_runtime_full_story(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "server.demo", "--out", str(run_dir), "--unlabeled", "3", "--per-class", "1",
           "--lae-rounds", "1", "--dm-rounds", "1", "--local-steps", "1", "--overrides", OVERRIDES, "--timeout", "300", "--no-augment"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=360)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = load_state(run_dir)
    assert state.status == "done" and state.scale_factor > 0
    metrics = read_metrics(run_dir)
    assert [m["phase"] for m in metrics] == ["lae", "latent-stats", "dm", "deliver"]
    assert [m["sites_answered"] for m in metrics] == [3, 3, 3, 1]
    assert metrics[-1]["labeled_sites"]  # only metrics came back from the labeled site
    info = json.loads((run_dir / "global_model" / "model_info.json").read_text())
    assert info["scale_factor"] == pytest.approx(state.scale_factor)
    assert "[fed] dm round 1/1" in res.stdout
    # each virtual site generated its own phantom tiles (its own stain style)
    assert (run_dir / "sites" / "site3" / "phantom-tiles" / "TUM").is_dir()
    assert not (run_dir / "sites" / "site0" / "phantom-tiles" / "TUM").is_dir()
