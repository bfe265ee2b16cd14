"""Real Flower processes on loopback: a SuperLink and 3 SuperNodes with TLS and node authentication."""

import json
import shlex
import socket
import subprocess
import sys

import pytest

from server import flwr_cli
from server.certs import create
from strategies.checkpoint import read_metrics
from strategies.schedule import load_state
from tests.e2e.loopback import OVERRIDES, REPO, Processes, make_sites, run_config, wait_for

pytestmark = pytest.mark.e2e

# The coordinator's address in the README-commands test: a loopback address that is not localhost, so a
# certificate naming only localhost/127.0.0.1, or a SuperLink bound to 127.0.0.1, fails the test (Linux routes all
# of 127.0.0.0/8 to the loopback interface). Only loopback addresses are ever used here.
COORDINATOR = "127.0.0.2"


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path / "logs")
    yield p
    p.stop_all()


def _server_cmd(run_dir, port, certs, **extra):
    return [sys.executable, "-m", "server.run", "--run-dir", str(run_dir), "--port", str(port), "--certs", str(certs),
            "--config", run_config(**extra), "--timeout", "420"]


def _readme_env() -> dict:
    """Flower's environment for commands run, like the README's, from a folder outside the checkout."""
    env = flwr_cli.flower_env()
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _printed_site_commands(log_file) -> dict[str, list[str]]:
    """The ``python -m client.run`` lines ``server.run`` printed, by site."""
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    argvs = [shlex.split(line) for line in text.splitlines() if line.startswith("  python -m client.run ")]
    return {argv[argv.index("--site") + 1]: argv for argv in argvs}


# slow (make test-all): on this 2-core machine Flower 1.42's SuperLink answers the ServerApp's pulls with
# "database is locked" (its SQLite state) during these SecAgg+ rounds, and the ServerApp stops; seen three times on
# 2026-12-01, once with nothing else running. The README's deployment commands stay covered in make test by
# test_unregistered_supernode_is_refused and the coordinator-lifecycle tests.
@pytest.mark.slow
@pytest.mark.timeout(1100)  # SecAgg+ rounds: four ClientApp processes per site per round
def test_tls_auth_federation_three_sites(tmp_path, procs):
    """The README's deployment commands end to end, the coordinator reached at 127.0.0.2 (not localhost):
    ``server.certs --host``, ``server.run --host``, and each site runs the command line ``server.run`` printed.
    SecAgg+ is on: its secrets live in each SuperNode's run context between the protocol's messages (the
    simulation e2e test covers plain aggregation)."""
    sites = make_sites(tmp_path / "data", 3)
    env = _readme_env()
    res = subprocess.run([sys.executable, "-m", "server.certs", "--out", "certs", "--sites", "3", "--host", COORDINATOR],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    port = flwr_cli.free_port(COORDINATOR)
    run_dir = tmp_path / "run"
    server = procs.start("server", [sys.executable, "-m", "server.run", "--run-dir", "run", "--certs", "certs",
                                    "--host", COORDINATOR, "--port", str(port), "--timeout", "900", "--config",
                                    run_config(overrides=f'"{OVERRIDES} privacy.secagg=true"')], env=env, cwd=tmp_path)
    server_log = tmp_path / "logs" / "server.log"
    wait_for(lambda: len(_printed_site_commands(server_log)) == 3 or server.poll() is not None, 120,
             "the site command lines", details=lambda: procs.log("server"))
    assert server.poll() is None, procs.log("server")
    commands = _printed_site_commands(server_log)
    with pytest.raises(OSError):  # it listens on the address it was given, not on 127.0.0.1
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    for i, data in enumerate(sites):
        argv = commands[f"site{i}"]
        assert argv[:3] == ["python", "-m", "client.run"]
        assert argv[argv.index("--superlink") + 1] == f"{COORDINATOR}:{port}"
        assert argv[argv.index("--root-certificates") + 1] == "certs/ca.crt"
        assert argv[argv.index("--auth-key") + 1] == f"certs/sites/site{i}"
        assert argv[argv.index("--role") + 1] == "unlabeled"
        argv[argv.index("--data") + 1] = str(data)  # the site's own tile folder
        procs.start(f"site{i}", [sys.executable, *argv[1:], "--work", str(tmp_path / f"w{i}"),
                                 "--port", str(flwr_cli.free_port()), "--overrides", OVERRIDES], env=env, cwd=tmp_path)
    assert server.wait(timeout=960) == 0, server_log.read_text()[-3000:]
    state = load_state(run_dir)
    assert state.status == "done" and state.scale_factor > 0
    metrics = read_metrics(run_dir)
    assert [m["phase"] for m in metrics] == ["lae", "latent-stats", "dm", "memorisation"]
    assert all(m["sites_answered"] == 3 for m in metrics)
    secure = metrics[:-1]  # the memorisation figures are per site by design, never masked
    assert all(m["secagg"]["sites_masked"] == 3 and not m["secagg"]["dropouts_unmasked"] for m in secure)
    assert len({m.get("scale_factor") for m in metrics if "scale_factor" in m}) == 1
    info = json.loads((run_dir / "global_model" / "model_info.json").read_text())
    assert info["scale_factor"] == pytest.approx(state.scale_factor)
    assert (run_dir / state.checkpoint / "unet" / "config.json").is_file()
    out = server_log.read_text()
    assert "[fed] lae round 1/1" in out and "[fed] dm round 1/1" in out
    assert f"SuperLink listening on {COORDINATOR}:{port}" in out


@pytest.mark.timeout(180)
def test_unregistered_supernode_is_refused(tmp_path, procs):
    certs = create(tmp_path / "certs", 2)
    sites = make_sites(tmp_path / "data", 1)
    port = flwr_cli.free_port()
    link = procs.start("superlink", flwr_cli.superlink_cmd(port, certs))
    flwr_cli.wait_healthy(port, link)
    home = flwr_cli.write_flwr_home(tmp_path / "home", f"127.0.0.1:{port}", certs / "ca.crt")
    flwr_cli.register_keys(home, [certs / "sites" / "site0.pub"])  # site1 is never registered
    # client.run retries a refused activation (a restarted site is refused until its heartbeat window ends), so
    # an unregistered key is refused again and again until the site gives up, with one line saying why
    node = procs.supernode("intruder", sites[0], f"127.0.0.1:{port}", certs, certs / "sites" / "site1", tmp_path / "w",
                           give_up_after=20)
    code = node.wait(timeout=120)
    assert code != 0
    log = (tmp_path / "logs" / "intruder.log").read_text()
    assert "Exit Code: 305" in log  # Flower's "not authorised"
    assert "error: gave up after" in log and "refused to activate this node" in log


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
