"""Lint the container images that cannot be built here (no Docker engine): pinned bases, multi-stage with no
build tools in the runtime stage, non-root user, weights baked in, and every entry point a module of this repo."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.test_k8s_manifests import K8S, OVERLAYS, render

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "deploy" / "docker" / "Dockerfile.gpu", "cpu": REPO / "deploy" / "docker" / "Dockerfile.cpu"}
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "git", "python3-dev", "-dev ", "cmake", "curl", "wget")
PINNED = re.compile(r"^[\w./-]+:[\w.-]*\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$|^[\w./-]+(:[\w.-]+)?@sha256:[0-9a-f]{64}$")


def parse(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, args = current.partition(" ")
        lines.append((instr.upper(), args.strip()))
        current = ""
    return lines


def stages(instructions):
    """Split into stages; resolve FROM images through the global ARG defaults."""
    args, out = {}, []
    for instr, rest in instructions:
        if instr == "ARG" and not out and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        if instr == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            out.append({"image": image, "name": name, "body": []})
        elif out:
            out[-1]["body"].append((instr, rest))
    return out


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def dockerfile(request):
    return request.param, stages(parse(DOCKERFILES[request.param]))


def test_base_images_pinned_never_latest(dockerfile):
    _, st = dockerfile
    names = {s["name"] for s in st if s["name"]}
    for s in st:
        if s["image"] in names:
            continue
        assert "$" not in s["image"], f"unresolved base image {s['image']}"
        assert not s["image"].endswith(":latest") and ":" in s["image"], s["image"]
        assert PINNED.match(s["image"]), f"{s['image']}: pin an exact version tag (and/or a digest)"


def test_multi_stage_runtime_without_build_tools(dockerfile):
    kind, st = dockerfile
    assert len(st) >= 2, "multi-stage: build in one stage, copy the result into a clean one"
    final = st[-1]
    runs = " ".join(rest for instr, rest in final["body"] if instr == "RUN") + " "
    for tool in BUILD_TOOLS:
        assert tool not in runs, f"runtime stage installs {tool.strip()}"
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists" in runs
    copies = [rest for instr, rest in final["body"] if instr == "COPY"]
    assert all(c.startswith("--from=") for c in copies), "the runtime stage copies only built artefacts"
    if kind == "gpu":
        assert final["image"].startswith("nvidia/cuda:") and "-runtime-" in final["image"], "CUDA *runtime* base"


def test_runs_as_non_root(dockerfile):
    _, st = dockerfile
    users = [rest for instr, rest in st[-1]["body"] if instr == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # the uid matches the manifests' runAsUser, so files the image owns and volumes agree
    for overlay in OVERLAYS:
        for obj in render.render(K8S / "overlays" / overlay):
            spec = render.pod_spec(obj)
            if spec is not None:
                assert str(spec["securityContext"]["runAsUser"]) == user


def test_weights_baked_in_and_offline_env(dockerfile):
    _, st = dockerfile
    builder_runs = " ".join(rest for s in st[:-1] for instr, rest in s["body"] if instr == "RUN")
    assert "python -m histodiff.weights fetch" in builder_runs
    final_env = " ".join(rest for instr, rest in st[-1]["body"] if instr == "ENV")
    for needed in ("HISTODIFF_CACHE=", "HF_HUB_OFFLINE=1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1", "HOME=/tmp"):
        assert needed in final_env
    cache = re.search(r"HISTODIFF_CACHE=(\S+)", final_env).group(1)
    copies = [rest for instr, rest in st[-1]["body"] if instr == "COPY"]
    assert any(cache in c for c in copies), "the weights cache must be copied into the runtime stage"


def _cmd_modules(body) -> list[str]:
    mods = []
    for instr, rest in body:
        if instr in ("CMD", "ENTRYPOINT"):
            argv = __import__("json").loads(rest) if rest.startswith("[") else shlex.split(rest)
            if len(argv) >= 3 and argv[0].startswith("python") and argv[1] == "-m":
                mods.append(argv[2])
    return mods


def _module_exists(module: str) -> bool:
    path = REPO / module.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def test_entrypoints_exist_and_are_copied(dockerfile):
    kind, st = dockerfile
    copied_dirs = {rest.split()[0].rstrip("/") for s in st[:-1] for instr, rest in s["body"]
                   if instr == "COPY" and not rest.startswith("--from")}
    modules = set(_cmd_modules(st[-1]["body"]))
    for overlay in OVERLAYS:  # the modules the manifests run in this image
        for obj in render.render(K8S / "overlays" / overlay):
            for c in render.containers(obj):
                if f"histodiff-fed-{kind}:" in c["image"]:
                    argv = render.container_argv(c)
                    if argv[:2] == ["python", "-m"]:
                        modules.add(argv[2])
    assert modules or kind == "cpu"
    for module in modules:
        assert _module_exists(module), f"{module} is not a module of this repository"
        assert module.split(".")[0] in copied_dirs, f"{module}: its package is not copied into the image"


def test_images_used_by_manifests_are_the_two_built_here():
    for overlay in OVERLAYS:
        for obj in render.render(K8S / "overlays" / overlay):
            for c in render.containers(obj):
                image = c["image"]
                assert re.search(r"/histodiff-fed-(gpu|cpu):\d+\.\d+\.\d+$", image), image
                requests_gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                assert ("-gpu:" in image) == requests_gpu, f"{overlay}/{c['name']}: GPU image iff GPU request"


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: a pattern that matches a path or one of its parent folders excludes it;
    the last matching pattern wins; ``!`` re-includes."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_images_copy_and_nothing_private():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in DOCKERFILES.values():
        for s in stages(parse(path)):
            for instr, rest in s["body"]:
                if instr == "COPY" and not rest.startswith("--from"):
                    for src in rest.split()[:-1]:
                        assert not _ignored(src.rstrip("/"), patterns), f"{src} is excluded by .dockerignore"
    for private in (".git/config", "runs/demo/x.pt", ".venv/bin/python", "certs/ca.key", "shared/data/a.png",
                    "histodiff/__pycache__/x.pyc", "tests/test_x.py", "server/certs/server.key"):
        assert _ignored(private, patterns), f"{private} would enter the build context"
