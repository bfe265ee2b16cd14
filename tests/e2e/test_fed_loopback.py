"""Real Flower processes on loopback: a SuperLink and 3 SuperNodes with TLS and node authentication."""

import json
import subprocess
import sys

import pytest

from server import flwr_cli
from server.certs import create
from strategies.checkpoint import read_metrics
from strategies.schedule import load_state
from tests.e2e.loopback import RUN_CONFIG, Processes, make_sites, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path / "logs")
    yield p
    p.stop_all()


def _server_cmd(run_dir, port, certs, extra=""):
    return [sys.executable, "-m", "server.run", "--run-dir", str(run_dir), "--port", str(port), "--certs", str(certs),
            "--config", f"{RUN_CONFIG} {extra}".strip(), "--timeout", "420"]


@pytest.mark.timeout(600)
def test_tls_auth_federation_three_sites(tmp_path, procs):
    certs = create(tmp_path / "certs", 3)
    sites = make_sites(tmp_path / "data", 3)
    port = flwr_cli.free_port()
    run_dir = tmp_path / "run"
    server = procs.start("server", _server_cmd(run_dir, port, certs))
    wait_for(lambda: (run_dir / "flwr-run.log").exists() or (run_dir / "logs" / "flwr-run.log").exists()
             or server.poll() is not None, 120, "the run to be submitted")
    for i, data in enumerate(sites):
        procs.supernode(f"site{i}", data, f"127.0.0.1:{port}", certs, certs / "sites" / f"site{i}", tmp_path / f"w{i}")
    assert server.wait(timeout=480) == 0, (tmp_path / "logs" / "server.log").read_text()[-3000:]
    state = load_state(run_dir)
    assert state.status == "done" and state.scale_factor > 0
    metrics = read_metrics(run_dir)
    assert [m["phase"] for m in metrics] == ["lae", "latent-stats", "dm"]
    assert all(m["sites_answered"] == 3 for m in metrics)
    assert len({m.get("scale_factor") for m in metrics if "scale_factor" in m}) == 1
    info = json.loads((run_dir / "global_model" / "model_info.json").read_text())
    assert info["scale_factor"] == pytest.approx(state.scale_factor)
    assert (run_dir / state.checkpoint / "unet" / "config.json").is_file()
    out = (tmp_path / "logs" / "server.log").read_text()
    assert "[fed] lae round 1/1" in out and "[fed] dm round 1/1" in out
