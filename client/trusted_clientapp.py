"""Only the coordinator's app runs at a site: a ``flwr-clientapp`` that checks the FAB before installing it.

``python -m client.run`` puts a ``flwr-clientapp`` shim first on its SuperNode's PATH; Flower's SuperExec starts
every ClientApp through that name, so every app a run delivers comes here first. The FAB (the zip of the app the
coordinator submitted) is checked in memory, before anything of it is written to disk, installed or imported:

* the **app digest** is sha256 over the sorted lines ``path NUL sha256(content)`` of every file in the FAB except
  documentation (``*.md``, ``LICENSE``); ``pyproject.toml`` counts only by its ``[project] name`` and its
  ``[tool.flwr.app.components]`` (which ServerApp/ClientApp objects run) — Flower rewrites that file when it
  builds a FAB, and its run-config defaults can be overridden by any run anyway;
* a site trusts the digest of its own copy of this project (the same release as the coordinator's, computed over
  the files ``flwr run`` would pack from it: Flower's own .gitignore and include/exclude rules), or the digest(s)
  pinned in a file given with ``client.run --trusted-app FILE`` (one hex digest a line, ``#`` comments);
* a FAB whose digest is not trusted, or that is not a well-formed zip of unique names, is refused: one line
  ``histodiff trust: REFUSED app ...`` on the site's log, and an exception, so Flower answers the run with an
  error and nothing of the app runs.

``python -m client.trusted_clientapp digest [DIR]`` prints the digest of a checkout (default: this one): the
coordinator publishes it, a site pins it. ``python -m client.trusted_clientapp digest --fab FILE.fab`` prints a
FAB's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path

ENV_DIGESTS = "HISTODIFF_TRUSTED_APP_DIGESTS"  # comma-separated digests the shim hands to this process
PROJECT_ROOT = Path(__file__).resolve().parents[1]
_DOC_SUFFIXES = (".md",)
_DOC_NAMES = ("LICENSE",)


class UntrustedApp(PermissionError):
    """The FAB a run delivered is not the app this site trusts."""


def _pyproject_identity(content: bytes) -> bytes:
    """What of pyproject.toml counts: the project name and the app components, canonical JSON."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    config = tomllib.loads(content.decode("utf-8"))
    name = (config.get("project") or {}).get("name")
    components = ((config.get("tool") or {}).get("flwr") or {}).get("app", {}).get("components")
    return json.dumps({"name": name, "components": components}, sort_keys=True).encode()


def app_digest(files: dict[str, bytes]) -> str:
    """The app digest of a FAB's files (relative POSIX path -> content); see the module docstring."""
    lines = []
    for path in sorted(files):
        if path.endswith(_DOC_SUFFIXES) or path in _DOC_NAMES:
            continue
        content = _pyproject_identity(files[path]) if path == "pyproject.toml" else files[path]
        lines.append(f"{path}\0{hashlib.sha256(content).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def fab_files(fab: bytes) -> dict[str, bytes]:
    """The files of a FAB (without Flower's ``.info/`` manifest); raises UntrustedApp on a malformed one."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            if len(names) != len(set(names)):
                raise UntrustedApp("the FAB holds two entries with the same name")
            return {n: zf.read(n) for n in names if not n.startswith(".info/")}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UntrustedApp(f"the FAB is not a readable zip ({exc})") from None


def local_files(root: Path = PROJECT_ROOT) -> dict[str, bytes]:
    """The files ``flwr run`` would pack from the checkout ``root`` (Flower's own selection rules)."""
    from flwr.cli.build import get_filtered_fab_paths
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    root = Path(root).expanduser().resolve()
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{root} has no pyproject.toml (not a checkout of the app)")
    files = filter_paths_for_publish(collect_files(root))
    pyproject = (root / "pyproject.toml").read_bytes()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    paths = get_filtered_fab_paths(files, tomllib.loads(pyproject.decode("utf-8")))
    out = {p: (files[p].read_bytes() if isinstance(files[p], Path) else files[p]) for p in paths}
    out["pyproject.toml"] = pyproject
    return out


def local_digest(root: Path = PROJECT_ROOT) -> str:
    return app_digest(local_files(root))


def read_pinned(path: Path) -> list[str]:
    """Digests pinned in a file: one 64-hex-digit digest a line, blank lines and ``#`` comments ignored."""
    digests = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        word = line.split("#", 1)[0].strip().lower()
        if not word:
            continue
        if len(word) != 64 or any(c not in "0123456789abcdef" for c in word):
            raise ValueError(f"{path} line {n}: not a sha256 hex digest: {word[:70]!r}")
        digests.append(word)
    if not digests:
        raise ValueError(f"{path} pins no digest")
    return digests


def describe(files: dict[str, bytes]) -> str:
    """``publisher/name version`` from a FAB's pyproject.toml, for the log."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        config = tomllib.loads(files["pyproject.toml"].decode("utf-8"))
        project = config.get("project", {})
        publisher = config.get("tool", {}).get("flwr", {}).get("app", {}).get("publisher", "?")
        return f"{publisher}/{project.get('name', '?')} {project.get('version', '?')}"
    except Exception:  # noqa: BLE001 - a rogue pyproject must not hide the refusal line
        return "<no readable pyproject.toml>"


def check_fab(fab: bytes, trusted: list[str]) -> str:
    """The FAB's digest when it is trusted; otherwise log the one refusal line and raise UntrustedApp."""
    fab_hash = hashlib.sha256(fab).hexdigest()
    try:
        files = fab_files(fab)
        digest, what = app_digest(files), describe(files)
    except UntrustedApp as exc:
        digest, what, reason = "-", "<malformed FAB>", str(exc)
    else:
        reason = None
    if reason is None and digest in trusted:
        print(f"histodiff trust: accepted app {what} (app digest {digest})", file=sys.stderr, flush=True)
        return digest
    line = (f"histodiff trust: REFUSED app {what} (FAB sha256 {fab_hash[:16]}): app digest {digest}, this site "
            f"trusts only {', '.join(trusted) or '<nothing>'}" + (f"; {reason}" if reason else ""))
    print(line, file=sys.stderr, flush=True)
    raise UntrustedApp(line.removeprefix("histodiff trust: "))


def trusted_from_env() -> list[str]:
    return [d.strip().lower() for d in os.environ.get(ENV_DIGESTS, "").split(",") if d.strip()]


def run_flwr_clientapp(argv: list[str]) -> None:
    """Flower's own ``flwr-clientapp`` with its ``install_from_fab`` guarded by ``check_fab``."""
    trusted = trusted_from_env()
    # this module came from the site's copy of the project: forget it, so the app is imported from its FAB
    for name in [m for m in sys.modules if m == "client" or m.startswith("client.")]:
        if name != __name__:
            del sys.modules[name]
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    flower_install = runtime.install_from_fab

    def guarded_install(fab_file, *args, **kwargs):
        content = fab_file.read_bytes() if isinstance(fab_file, Path) else fab_file
        check_fab(content, trusted)
        return flower_install(content, *args, **kwargs)

    runtime.install_from_fab = guarded_install
    sys.argv = ["flwr-clientapp", *argv]
    flwr_clientapp()


def write_shim(directory: Path, trusted: list[str], python: str = sys.executable) -> Path:
    """A ``flwr-clientapp`` executable in ``directory`` that runs this module with the trusted digests."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "flwr-clientapp"
    q = lambda s: "'" + str(s).replace("'", "'\\''") + "'"  # noqa: E731 - POSIX shell quoting
    shim.write_text("#!/bin/sh\n# histodiff: every ClientApp this SuperNode starts passes the app trust check\n"
                    f"{ENV_DIGESTS}={q(','.join(trusted))}\n"
                    f"PYTHONPATH={q(PROJECT_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
                    f"export {ENV_DIGESTS} PYTHONPATH\n"
                    f"exec {q(python)} -m client.trusted_clientapp run \"$@\"\n")
    shim.chmod(0o755)
    return shim


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        run_flwr_clientapp(argv[1:])
        return 0
    if argv[:1] == ["digest"]:
        rest = argv[1:]
        try:
            if rest[:1] == ["--fab"] and len(rest) == 2:
                print(app_digest(fab_files(Path(rest[1]).read_bytes())))
            elif len(rest) <= 1:
                print(local_digest(Path(rest[0]) if rest else PROJECT_ROOT))
            else:
                raise ValueError("usage: digest [DIR] | digest --fab FILE")
        except (OSError, ValueError, UntrustedApp) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    print("usage: python -m client.trusted_clientapp digest [DIR] | digest --fab FILE.fab | run FLWR_CLIENTAPP_ARGS",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
