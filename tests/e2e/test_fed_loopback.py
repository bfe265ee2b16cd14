"""Real Flower processes on loopback: a SuperLink and 3 SuperNodes with TLS and node authentication."""

import json
import sys

import pytest

from server import flwr_cli
from server.certs import create
from strategies.checkpoint import read_metrics
from strategies.schedule import load_state
from tests.e2e.loopback import OVERRIDES, Processes, make_sites, run_config, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path / "logs")
    yield p
    p.stop_all()


def _server_cmd(run_dir, port, certs, **extra):
    return [sys.executable, "-m", "server.run", "--run-dir", str(run_dir), "--port", str(port), "--certs", str(certs),
            "--config", run_config(**extra), "--timeout", "420"]


@pytest.mark.timeout(600)
def test_tls_auth_federation_three_sites(tmp_path, procs):
    """The deployment path end to end, with SecAgg+ on: its secrets live in each SuperNode's run context
    between the protocol's messages (the simulation e2e test covers plain aggregation)."""
    certs = create(tmp_path / "certs", 3)
    sites = make_sites(tmp_path / "data", 3)
    port = flwr_cli.free_port()
    run_dir = tmp_path / "run"
    server = procs.start("server", _server_cmd(run_dir, port, certs,
                                               overrides=f'"{OVERRIDES} privacy.secagg=true"'))
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
    assert all(m["secagg"]["sites_masked"] == 3 and not m["secagg"]["dropouts_unmasked"] for m in metrics)
    assert len({m.get("scale_factor") for m in metrics if "scale_factor" in m}) == 1
    info = json.loads((run_dir / "global_model" / "model_info.json").read_text())
    assert info["scale_factor"] == pytest.approx(state.scale_factor)
    assert (run_dir / state.checkpoint / "unet" / "config.json").is_file()
    out = (tmp_path / "logs" / "server.log").read_text()
    assert "[fed] lae round 1/1" in out and "[fed] dm round 1/1" in out


@pytest.mark.timeout(180)
def test_unregistered_supernode_is_refused(tmp_path, procs):
    certs = create(tmp_path / "certs", 2)
    sites = make_sites(tmp_path / "data", 1)
    port = flwr_cli.free_port()
    link = procs.start("superlink", flwr_cli.superlink_cmd(port, certs))
    flwr_cli.wait_healthy(port, link)
    home = flwr_cli.write_flwr_home(tmp_path / "home", f"127.0.0.1:{port}", certs / "ca.crt")
    flwr_cli.register_keys(home, [certs / "sites" / "site0.pub"])  # site1 is never registered
    node = procs.supernode("intruder", sites[0], f"127.0.0.1:{port}", certs, certs / "sites" / "site1", tmp_path / "w")
    code = node.wait(timeout=120)
    assert code != 0
    assert "Exit Code: 305" in (tmp_path / "logs" / "intruder.log").read_text()  # Flower's "not authorised"


def _start_federation(tmp_path, procs, **extra):
    certs = create(tmp_path / "certs", 3)
    sites = make_sites(tmp_path / "data", 3)
    port = flwr_cli.free_port()
    run_dir = tmp_path / "run"
    server = procs.start("server", _server_cmd(run_dir, port, certs, **extra))
    wait_for(lambda: (run_dir / "coordinator.json").exists() or server.poll() is not None, 120, "the SuperLink")
    nodes = [procs.supernode(f"site{i}", d, f"127.0.0.1:{port}", certs, certs / "sites" / f"site{i}", tmp_path / f"w{i}")
             for i, d in enumerate(sites)]
    return run_dir, server, nodes, port, certs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_supernode_killed_mid_round_run_completes(tmp_path, procs):
    run_dir, server, nodes, _, _ = _start_federation(tmp_path, procs, lae_rounds="2", round_timeout="60.0")
    wait_for(lambda: read_metrics(run_dir) or server.poll() is not None, 400, "the first round")
    assert server.poll() is None, (tmp_path / "logs" / "server.log").read_text()[-3000:]
    flwr_cli.stop(nodes[2], grace=0.1)  # site2 disappears while the next round is running
    assert server.wait(timeout=600) == 0, (tmp_path / "logs" / "server.log").read_text()[-3000:]
    metrics = read_metrics(run_dir)
    assert load_state(run_dir).status == "done"
    assert [m["phase"] for m in metrics] == ["lae", "lae", "latent-stats", "dm"]
    assert min(m["sites_answered"] for m in metrics[1:]) == 2
    assert any(m["dropped"] for m in metrics[1:])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_killed_and_resumed(tmp_path, procs):
    run_dir, server, nodes, port, certs = _start_federation(tmp_path, procs, lae_rounds="2")
    wait_for(lambda: read_metrics(run_dir) or server.poll() is not None, 400, "the first round")
    assert server.poll() is None, (tmp_path / "logs" / "server.log").read_text()[-3000:]
    link_pid = json.loads((run_dir / "coordinator.json").read_text())["superlink_pid"]
    import os
    import signal

    os.killpg(link_pid, signal.SIGKILL)  # the SuperLink and its ServerApp crash
    flwr_cli.stop(server, grace=0.1)
    done_before = load_state(run_dir).global_round
    assert done_before >= 1
    resumed = procs.start("resumed", [sys.executable, "-m", "server.run", "--resume", str(run_dir), "--timeout", "500"])
    assert resumed.wait(timeout=600) == 0, (tmp_path / "logs" / "resumed.log").read_text()[-3000:]
    phases = [m["phase"] for m in read_metrics(run_dir)]
    assert phases[-2:] == ["latent-stats", "dm"] and phases.count("lae") == 2
    log = (tmp_path / "logs" / "resumed.log").read_text()
    assert "resumed" in log
    kept = json.loads((run_dir / "coordinator.json").read_text())["config"]
    assert "perceptual_weight=0" in kept  # the resumed run kept the original run config
