"""Only the coordinator's app runs at a site: a real SuperLink on loopback, two sites started with
``python -m client.run`` (their ``flwr-clientapp`` shim checks every FAB), a rogue app submitted with ``flwr run``
never runs at a site, and this project's app gets past the check."""

import subprocess
import textwrap

import pytest

from server import flwr_cli
from tests.e2e.loopback import REPO, Processes, make_sites, run_config, wait_for

pytestmark = pytest.mark.e2e


def _rogue_app(root, marker):
    """A different Flower app: its ServerApp asks every node; its ClientApp (import and call) writes ``marker``."""
    app = root / "rogueapp"
    (app / "rogue").mkdir(parents=True)
    (app / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "rogueapp"
        version = "1.0.0"
        description = "not the coordinator's app"
        license = "Apache-2.0"
        dependencies = []

        [tool.flwr.app]
        publisher = "mallory"

        [tool.flwr.app.components]
        serverapp = "rogue.server:app"
        clientapp = "rogue.client:app"
        """))
    (app / "rogue" / "__init__.py").write_text("")
    (app / "rogue" / "client.py").write_text(textwrap.dedent(f"""\
        from pathlib import Path
        from flwr.app import Message, RecordDict
        from flwr.clientapp import ClientApp

        Path({str(marker)!r}).write_text("imported at a site")
        app = ClientApp()

        @app.query()
        def query(msg, context):
            Path({str(marker)!r}).write_text("ran at a site")
            return Message(RecordDict(), reply_to=msg)
        """))
    (app / "rogue" / "server.py").write_text(textwrap.dedent("""\
        import time
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.serverapp import ServerApp

        app = ServerApp()

        @app.main()
        def main(grid, context):
            nodes = []
            for _ in range(120):
                nodes = list(grid.get_node_ids())
                if len(nodes) >= 2:
                    break
                time.sleep(0.5)
            msgs = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
                    for n in nodes]
            print("rogue replies:", [m.has_error() for m in grid.send_and_receive(msgs, timeout=90)])
        """))
    return app


@pytest.mark.timeout(300)
def test_rogue_app_never_runs_at_a_site_and_ours_does(tmp_path):
    procs = Processes(tmp_path / "logs")
    try:
        home = tmp_path / "flwr-home"
        port = flwr_cli.free_port()
        superlink = f"127.0.0.1:{port}"
        link = procs.start("superlink", flwr_cli.superlink_cmd(port, None, database=tmp_path / "state.db"),
                           cwd=tmp_path, flwr_home=tmp_path / "link-home")
        flwr_cli.wait_healthy(port, link, tls=False)
        flwr_cli.write_flwr_home(home, superlink, None, insecure=True)
        sites = make_sites(tmp_path / "data", 2)
        names = [f"site{i}" for i in range(2)]
        for name, data in zip(names, sites):
            procs.supernode(name, data, superlink, None, None, tmp_path / f"{name}-work")
        details = lambda: "\n".join(f"--- {n}\n{procs.log(n)}" for n in ["superlink", *names])  # noqa: E731
        wait_for(lambda: all("SuperNode: connected" in procs.log(n) for n in names), 120, "both sites to connect",
                 details=details)

        marker = tmp_path / "ROGUE-CODE-RAN"
        rogue = _rogue_app(tmp_path, marker)
        env = flwr_cli.flower_env(home)
        res = subprocess.run(["flwr", "run", str(rogue), flwr_cli.CONNECTION], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr  # the SuperLink takes the run ...
        wait_for(lambda: all("histodiff trust: REFUSED app mallory/rogueapp 1.0.0" in procs.log(n) for n in names),
                 120, "both sites to refuse the rogue app", details=details)
        assert not marker.exists(), marker.read_text()  # ... but no site ran (or even imported) any of it
        for n in names:
            line = next(l for l in procs.log(n).splitlines() if "histodiff trust: REFUSED" in l)
            assert "app digest" in line and "this site trusts only" in line

        # this project's own app, as `flwr run` packs it from the coordinator's checkout, passes the check
        res = subprocess.run(["flwr", "run", str(REPO), flwr_cli.CONNECTION, "--run-config", run_config()],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: all("histodiff trust: accepted app histodiff/histodiff-fed" in procs.log(n) for n in names),
                 150, "both sites to accept the project's app", details=details)
        assert not marker.exists()
    finally:
        procs.stop_all()


def _children(pid: int) -> list[int]:
    from pathlib import Path

    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.timeout(420)
def test_supernode_killed_and_restarted_rejoins(tmp_path):
    """TLS and node authentication on: kill -9 the site's flower-supernode; client.run restarts it, Flower refuses
    the same key while its heartbeat window lasts (exit code 305), and client.run retries until it is back."""
    import os
    import signal

    from server.certs import create

    procs = Processes(tmp_path / "logs")
    try:
        certs = create(tmp_path / "certs", 1)
        port = flwr_cli.free_port()
        link = procs.start("superlink", flwr_cli.superlink_cmd(port, certs, database=tmp_path / "state.db"),
                           cwd=tmp_path, flwr_home=tmp_path / "link-home")
        flwr_cli.wait_healthy(port, link)
        home = flwr_cli.write_flwr_home(tmp_path / "flwr-home", f"127.0.0.1:{port}", certs / "ca.crt")
        flwr_cli.register_keys(home, [certs / "sites" / "site0.pub"])
        data = make_sites(tmp_path / "data", 1)[0]
        site = procs.supernode("site0", data, f"127.0.0.1:{port}", certs, certs / "sites" / "site0",
                               tmp_path / "work")
        details = lambda: procs.log("site0") + "\n--- superlink\n" + procs.log("superlink")  # noqa: E731
        log_file = tmp_path / "logs" / "site0.log"
        connected = lambda: log_file.read_text(errors="replace").count("SuperNode: connected")  # noqa: E731
        wait_for(lambda: connected() == 1, 120, "the site to connect", details=details)
        supernode = [p for p in _children(site.pid)
                     if b"flower-supernode" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(supernode) == 1, _children(site.pid)
        os.kill(supernode[0], signal.SIGKILL)
        wait_for(lambda: connected() == 2, 300, "the site to rejoin", details=details)
        assert site.poll() is None
        text = log_file.read_text(errors="replace")
        assert "restarting" in text or "retrying" in text
    finally:
        procs.stop_all()
