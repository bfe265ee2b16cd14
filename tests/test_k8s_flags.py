"""Every flag the manifests pass exists: Flower's in the installed flower-superlink / flower-supernode, the
project's in its own argparse (``python -m server.run --help`` ...). Catches drift between code and manifests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from tests.test_k8s_manifests import K8S, OVERLAYS, SITES, render

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


@lru_cache(maxsize=None)
def help_flags(*cmd: str) -> frozenset[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               COLUMNS="200")
    out = subprocess.run(list(cmd) + ["--help"], capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert out.returncode == 0, f"{' '.join(cmd)} --help failed: {out.stderr[-2000:]}"
    return frozenset(FLAG.findall(out.stdout))


def _all_argvs():
    """(overlay, object, container, argv) for every container of every overlay."""
    for overlay in OVERLAYS:
        for obj in render.render(K8S / "overlays" / overlay):
            for c in render.containers(obj):
                yield overlay, obj["metadata"]["name"], c["name"], render.container_argv(c)


def _help_command(argv: list[str]) -> tuple[str, ...]:
    """The command whose --help documents argv's flags: a console script, or python -m MODULE [subcommand]."""
    if argv[0] == "python":
        assert argv[1] == "-m", argv
        sub = [argv[3]] if argv[2] == "server.certs" and argv[3:4] == ["register"] else []
        return (sys.executable, "-m", argv[2], *sub)
    script = BIN / argv[0]
    assert script.is_file(), f"{argv[0]} is not installed in {BIN}"
    return (str(script),)


def _used_flags(argv: list[str]) -> list[str]:
    start = 3 if argv[0] == "python" else 1
    return [a.split("=", 1)[0] for a in argv[start:] if a.startswith("--")]


@pytest.mark.parametrize("entry", [pytest.param(e, id=f"{e[0]}/{e[1]}/{e[2]}") for e in _all_argvs()])
def test_every_manifest_flag_exists(entry):
    _, _, _, argv = entry
    documented = help_flags(*_help_command(argv))
    missing = [f for f in _used_flags(argv) if f not in documented]
    assert not missing, f"{' '.join(argv[:3])}: flags not in --help: {missing}"


def test_supernode_flags_built_by_client_run_exist_in_flower():
    """The manifests run flower-supernode through client.run: the flags it builds must exist in Flower."""
    from client import run as client_run

    documented = help_flags(str(BIN / "flower-supernode"))
    for site in SITES:
        deploy = next(o for o in render.render(K8S / "overlays" / site) if o["kind"] == "Deployment")
        argv = render.container_argv(render.pod_spec(deploy)["containers"][0])
        args = client_run.parse(argv[3:])
        cmd = client_run.supernode_cmd(args, Path("/work"), args.site)
        assert cmd[0] == "flower-supernode"
        missing = [f for f in cmd[1:] if f.startswith("--") and f not in documented]
        assert not missing, f"client.run builds flower-supernode flags Flower 1.42 lacks: {missing}"
        assert "--insecure" not in cmd and "--auth-supernode-private-key" in cmd and "--root-certificates" in cmd


def _pairs(argv: list[str]) -> list[tuple[str, str | None]]:
    """(flag, its value or None) in argv, sorted: a value moved to another flag shows."""
    pairs = [(a, argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None)
             for i, a in enumerate(argv) if a.startswith("--")]
    return sorted(pairs, key=lambda p: (p[0], p[1] or ""))


def test_superlink_command_matches_the_one_server_run_starts():
    """The SuperLink pod runs what ``python -m server.run`` would start itself (same flags), plus --host 0.0.0.0."""
    from server import flwr_cli

    deploy = next(o for o in render.render(K8S / "overlays" / "coordinator") if o["kind"] == "Deployment")
    argv = render.container_argv(render.pod_spec(deploy)["containers"][0])
    value = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--") and not argv[i + 1].startswith("--")}
    certs = Path(value["--ssl-certfile"]).parent
    expected = flwr_cli.superlink_cmd(int(value["--port"]), certs, Path(value["--database"]), host=value["--host"])
    assert _pairs(argv) == _pairs(expected), "flower-superlink flags differ from server.flwr_cli.superlink_cmd"
    # the Secret's file names are the ones python -m server.certs writes
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"):
        assert Path(value[flag]).name in {"server.pem", "server.key", "ca.crt"}
