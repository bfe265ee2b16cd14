"""The manifests' own container commands, run on loopback: the rendered command/args/env of the SuperLink, the
coordinator Job's key registration and a site's SuperNode, with each volume replaced by a temporary folder
(Secrets filled from ``python -m server.certs`` output exactly as deploy/k8s/README.md creates them), the
Service address by 127.0.0.1 and free ports. The SuperLink must pass its own probe and the SuperNode must
connect with TLS and node authentication."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server import flwr_cli
from tests.e2e import loopback
from tests.test_k8s_manifests import K8S, render

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMAGE_APP_DIR = "/app"  # where the Dockerfiles put the repository


def secret_files(certs: Path, site: str) -> dict[str, dict[str, Path]]:
    """Secret name -> key -> file: what the README's ``kubectl create secret`` commands put in each Secret."""
    return {
        "histodiff-superlink-tls": {"ca.crt": certs / "ca.crt", "server.pem": certs / "server.pem",
                                    "server.key": certs / "server.key"},
        "histodiff-site-keys": {p.name: p for p in sorted((certs / "sites").glob("*.pub"))},
        "histodiff-site-credentials": {"ca.crt": certs / "ca.crt", "site.key": certs / "sites" / site},
    }


class Pod:
    """One rendered pod on this machine: volumes as folders, the container's argv/env with paths mapped."""

    def __init__(self, obj: dict, root: Path, claims: dict[str, Path], secrets: dict[str, dict[str, Path]]):
        self.spec = render.pod_spec(obj)
        self.root = root
        self.volumes: dict[str, Path] = {}
        for vol in self.spec.get("volumes", []):
            path = root / "volumes" / vol["name"]
            if "persistentVolumeClaim" in vol:
                path = claims[vol["persistentVolumeClaim"]["claimName"]]
                path.mkdir(parents=True, exist_ok=True)
            elif "secret" in vol:
                self._fill(path, secrets[vol["secret"]["secretName"]], vol["secret"].get("items"))
            elif "projected" in vol:
                for source in vol["projected"]["sources"]:
                    self._fill(path, secrets[source["secret"]["name"]], source["secret"].get("items"))
            elif "emptyDir" in vol:
                path.mkdir(parents=True, exist_ok=True)
            else:
                raise AssertionError(f"volume type of {vol['name']} not emulated")
            self.volumes[vol["name"]] = path

    @staticmethod
    def _fill(path: Path, files: dict[str, Path], items) -> None:
        path.mkdir(parents=True, exist_ok=True)
        mapping = {i["key"]: i["path"] for i in items} if items else {k: k for k in files}
        for key, rel in mapping.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[key], path / rel)
            (path / rel).chmod(0o400)

    def mounts(self, container: dict) -> list[tuple[str, Path]]:
        pairs = [(m["mountPath"], self.volumes[m["name"]]) for m in container.get("volumeMounts", [])
                 if m["mountPath"] != "/dev/shm"]
        pairs.append((IMAGE_APP_DIR, REPO))
        return sorted(pairs, key=lambda p: -len(p[0]))

    def map_path(self, container: dict, text: str) -> str:
        for mount, host in self.mounts(container):
            if text == mount or text.startswith(mount + "/"):
                return str(host) + text[len(mount):]
        return text

    def command(self, container: dict, env_override: dict[str, str], replace: dict[str, str]):
        """(argv, env, cwd) as the kubelet would start the container, mapped onto this machine."""
        argv = [replace.get(a, a) for a in render.container_argv(container, env_override)]
        argv = [self.map_path(container, a) for a in argv]
        if argv[0] == "python":
            argv[0] = sys.executable
        env = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "SYSTEMROOT")}
        for var in container.get("env", []):
            env[var["name"]] = self.map_path(container, env_override.get(var["name"], var["value"]))
        env["PATH"] = f"{BIN}{os.pathsep}/usr/bin:/bin"
        cwd = self.map_path(container, container.get("workingDir", IMAGE_APP_DIR))
        return argv, env, cwd


def http_probe(probe: dict, port: int) -> int | None:
    """The kubelet's httpGet probe: any status in 200..399 passes; HTTPS without certificate verification."""
    get = probe["httpGet"]
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    url = f"{get['scheme'].lower()}://127.0.0.1:{port}{get['path']}"
    try:
        with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1), context=ctx) as res:
            return res.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_for(predicate, timeout, what, procs: loopback.Processes, poll=0.5):
    return loopback.wait_for(predicate, timeout, what, poll, details=lambda: "\n".join(
        f"--- {p.name}\n{procs.log(p.stem)}" for p in sorted(procs.logs.glob("*.log"))))


def _by(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.fixture
def started(tmp_path):
    procs = loopback.Processes(tmp_path / "logs")
    yield procs
    procs.stop_all()


def bring_up(tmp_path: Path, started: loopback.Processes) -> dict:
    """SuperLink, key registration and site0's SuperNode from the rendered manifests; returns what they used."""
    from histodiff.data.phantom_tissue import write_phantom_site

    site = "site0"
    coordinator = render.render(K8S / "overlays" / "coordinator")
    site_objs = render.render(K8S / "overlays" / site)
    service = _by(coordinator, "Service", "histodiff-superlink")
    service_port = str(service["spec"]["ports"][0]["port"])
    link_port, node_port = flwr_cli.free_port(), flwr_cli.free_port()
    loopback = f"127.0.0.1:{link_port}"

    # credentials with the project's own command, as the README creates them
    certs = tmp_path / "certs"
    res = subprocess.run([sys.executable, "-m", "server.certs", "--out", str(certs), "--sites", "4",
                          "--host", "histodiff-superlink", "--host", "histodiff-superlink.histodiff-coordinator.svc"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    secrets = secret_files(certs, site)

    # tiny data on the site's (read-only) data volume, laid out as the manifests expect (<mount>/tiles)
    claims = {"histodiff-superlink-state": tmp_path / "pvc" / "superlink-state",
              "histodiff-site-data": tmp_path / "pvc" / "site-data", "histodiff-work": tmp_path / "pvc" / "work"}
    write_phantom_site(claims["histodiff-site-data"] / "tiles", per_class=1, size=64, site=0, seed=0, labeled=False)

    # 1. the SuperLink Deployment's container
    link_obj = _by(coordinator, "Deployment", "histodiff-superlink")
    link_pod = Pod(link_obj, tmp_path / "superlink", claims, secrets)
    link_c = link_pod.spec["containers"][0]
    argv, env, cwd = link_pod.command(link_c, {}, {"0.0.0.0": "127.0.0.1", service_port: str(link_port)})
    assert argv[:3] == [sys.executable, "-m", "server.superlink"]
    link = started.start("superlink", argv, env, cwd)
    probe = link_c["startupProbe"]
    wait_for(lambda: link.poll() is not None or (http_probe(probe, link_port) or 0) in range(200, 400),
             min(90, probe["periodSeconds"] * probe["failureThreshold"]), "the SuperLink's startup probe", started)
    assert link.poll() is None, started.log("superlink")
    for name in ("readinessProbe", "livenessProbe"):
        assert http_probe(link_c[name], link_port) == 200

    # 2. the coordinator Job's init container: register the site keys on the SuperLink
    job_obj = _by(coordinator, "Job", "histodiff-coordinator")
    job_pod = Pod(job_obj, tmp_path / "coordinator", claims, secrets)
    init_c = job_pod.spec["initContainers"][0]
    argv, env, cwd = job_pod.command(init_c, {"SUPERLINK": loopback}, {})
    res = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + started.log("superlink")
    flwr_home = Path(argv[argv.index("--flwr-home") + 1])
    assert (flwr_home / "config.toml").is_file()

    # 3. the site's SuperNode Deployment container (tiny profile instead of paper)
    node_obj = _by(site_objs, "Deployment", "histodiff-supernode")
    node_pod = Pod(node_obj, tmp_path / site, claims, secrets)
    node_c = node_pod.spec["containers"][0]
    container_port = node_c["args"][node_c["args"].index("--port") + 1]
    argv, env, cwd = node_pod.command(node_c, {"SUPERLINK": loopback, "PROFILE": "tiny"},
                                      {container_port: str(node_port)})
    assert argv[1:3] == ["-m", "client.run"] and "--auth-key" in argv and "--root-certificates" in argv
    node = started.start(site, argv, env, cwd)

    def online():
        if node.poll() is not None:
            return True
        out = subprocess.run([str(BIN / "flwr"), "supernode", "list", "histodiff", "--format", "json"],
                             env=dict(env, FLWR_HOME=str(flwr_home)), capture_output=True, text=True, timeout=60)
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except ValueError:
            return False
        return any(str(n.get("status", "")).lower() == "online" for n in nodes)

    wait_for(online, 120, "the SuperNode to be online on the SuperLink", started, poll=2.0)
    assert node.poll() is None, started.log(site)

    # the SuperNode's liveness probe (an exec probe) passes inside the "container"
    probe_cmd = [a.replace(f":{container_port}/", f":{node_port}/") for a in node_c["livenessProbe"]["exec"]["command"]]
    probe_cmd[0] = sys.executable
    res = subprocess.run(probe_cmd, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return {"coordinator": coordinator, "claims": claims, "secrets": secrets, "loopback": loopback, "link": link,
            "node": node}


@pytest.mark.timeout(240)
def test_manifest_commands_bring_up_a_tls_authenticated_federation(tmp_path, started):
    up = bring_up(tmp_path, started)
    assert up["link"].poll() is None and up["node"].poll() is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_coordinator_job_command_runs_a_tiny_federation(tmp_path, started):
    """The coordinator Job's main container (server.run --superlink ... --resume-or-start /state/runs/...) on a tiny run:
    the ServerApp inside the SuperLink "pod" and the Job must see the same run directory on the shared claim."""
    from strategies.schedule import load_state
    from tests.e2e.loopback import run_config

    up = bring_up(tmp_path, started)
    job_obj = _by(up["coordinator"], "Job", "histodiff-coordinator")
    job_pod = Pod(job_obj, tmp_path / "coordinator-main", up["claims"], up["secrets"])
    main_c = job_pod.spec["containers"][0]
    config = run_config(min_sites="1")
    argv, env, cwd = job_pod.command(main_c, {"SUPERLINK": up["loopback"], "RUN_CONFIG": config}, {})
    assert argv[1:3] == ["-m", "server.run"]
    res = subprocess.run(argv + ["--timeout", "420"], env=env, cwd=cwd, capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + started.log("superlink")
    run_dir = Path(argv[argv.index("--resume-or-start") + 1])
    assert run_dir.is_relative_to(up["claims"]["histodiff-superlink-state"])
    state = load_state(run_dir)
    assert state.status == "done" and state.scale_factor > 0
