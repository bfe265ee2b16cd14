"""App trust at a site (client.trusted_clientapp) and client.run giving up on an unreachable SuperLink."""

import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from client import trusted_clientapp as trust

REPO = Path(__file__).resolve().parents[1]


def _fab(files: dict[str, bytes], extra: list[tuple[str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in [*files.items(), *extra]:
            zf.writestr(name, content)
        zf.writestr(".info/CONTENT", "whatever")
    return buf.getvalue()


APP = {"pyproject.toml": b'[project]\nname = "app"\nversion = "1.0"\n[tool.flwr.app]\npublisher = "p"\n'
                         b'[tool.flwr.app.components]\nclientapp = "c:app"\nserverapp = "s:app"\n',
       "c.py": b"app = 1\n", "s.py": b"app = 2\n", "README.md": b"docs\n"}


def test_flowers_own_fab_of_this_checkout_has_the_local_digest():
    """What ``flwr run`` packs from this checkout is accepted: same files, same digest."""
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    assert set(trust.fab_files(fab)) == set(trust.local_files(REPO))
    assert trust.app_digest(trust.fab_files(fab)) == trust.local_digest(REPO)
    assert trust.check_fab(fab, [trust.local_digest(REPO)]) == trust.local_digest(REPO)


def test_digest_ignores_docs_and_run_config_defaults_but_not_code_or_components():
    base = trust.app_digest(APP)
    assert trust.app_digest({**APP, "README.md": b"other docs"}) == base
    assert trust.app_digest({**APP, "pyproject.toml": APP["pyproject.toml"] + b"[tool.flwr.app.config]\nx = 1\n"}) == base
    assert trust.app_digest({**APP, "c.py": b"app = 3\n"}) != base
    assert trust.app_digest({**APP, "evil.yaml": b"_target_: os.system\n"}) != base
    assert trust.app_digest({k: v for k, v in APP.items() if k != "s.py"}) != base
    rogue = APP["pyproject.toml"].replace(b'clientapp = "c:app"', b'clientapp = "s:app"')
    assert trust.app_digest({**APP, "pyproject.toml": rogue}) != base


def test_untrusted_or_malformed_fab_is_refused_with_one_line(capsys):
    good = trust.app_digest(APP)
    assert trust.check_fab(_fab(APP), [good]) == good
    assert capsys.readouterr().err.startswith("histodiff trust: accepted app p/app 1.0")
    rogue = {**APP, "c.py": b"import os; os.system('touch /tmp/pwned')\n"}
    for fab in (_fab(rogue), _fab(APP, extra=[("c.py", b"app = 9\n")]), b"not a zip"):
        with pytest.raises(trust.UntrustedApp):
            trust.check_fab(fab, [good])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("histodiff trust: REFUSED app ") and good in err[0]
    with pytest.raises(trust.UntrustedApp):
        trust.check_fab(_fab(APP), [])
    assert "p/app 1.0" in capsys.readouterr().err


def test_guarded_install_never_installs_an_untrusted_fab(monkeypatch, tmp_path):
    """The shim's wrapper around Flower's install_from_fab: refused FABs never reach Flower's installer."""
    import flwr.supernode.cli as cli
    from flwr.supernode.runtime import run_clientapp as runtime

    installed, seen = [], {}
    monkeypatch.setattr(runtime, "install_from_fab", lambda fab, *a, **k: installed.append(fab) or tmp_path)

    def fake_flwr_clientapp():  # what Flower's entry point does with the FAB it pulls
        seen["argv"] = list(sys.argv)
        for fab in (_fab(APP), _fab({**APP, "c.py": b"evil = 1\n"})):
            try:
                runtime.install_from_fab(fab, skip_prompt=True)
            except trust.UntrustedApp:
                seen["refused"] = True

    monkeypatch.setattr(cli, "flwr_clientapp", fake_flwr_clientapp)
    monkeypatch.setenv(trust.ENV_DIGESTS, trust.app_digest(APP))
    saved = {name: mod for name, mod in sys.modules.items() if name == "client" or name.startswith("client.")}
    try:
        trust.run_flwr_clientapp(["--insecure", "--token", "t"])
    finally:
        sys.modules.update(saved)  # it forgets the site's own `client` package (the app comes from its FAB)
    monkeypatch.setattr(sys, "argv", sys.argv)
    assert installed == [_fab(APP)] and seen["refused"] and seen["argv"][1:] == ["--insecure", "--token", "t"]


def test_pinned_digests_and_the_shim(tmp_path):
    pin = tmp_path / "trusted-app"
    pin.write_text(f"# coordinator's release\n{'a' * 64}\n\n{'B' * 64}  # next release\n")
    assert trust.read_pinned(pin) == ["a" * 64, "b" * 64]
    pin.write_text("not-a-digest\n")
    with pytest.raises(ValueError, match="not a sha256"):
        trust.read_pinned(pin)
    shim = trust.write_shim(tmp_path / "bin", ["a" * 64])
    text = shim.read_text()
    assert shim.name == "flwr-clientapp" and shim.stat().st_mode & 0o111
    assert "client.trusted_clientapp run" in text and "a" * 64 in text


def test_digest_command_prints_the_local_digest():
    res = subprocess.run([sys.executable, "-m", "client.trusted_clientapp", "digest"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == trust.local_digest(REPO)


@pytest.mark.timeout(180)
def test_client_run_gives_up_on_an_unreachable_superlink_with_one_line(tmp_path):
    from server import flwr_cli
    from tests.e2e.loopback import make_sites

    site = make_sites(tmp_path / "data", 1)[0]
    address = f"127.0.0.1:{flwr_cli.free_port()}"  # nothing listens there
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "client.run", "--data", str(site), "--superlink", address,
                          "--insecure", "--give-up-after", "5", "--work", str(tmp_path / "work")],
                         cwd=REPO, env=flwr_cli.flower_env(), capture_output=True, text=True, timeout=150)
    took = time.monotonic() - start
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 1, res.stderr[-3000:]
    assert len(errors) == 1 and address in errors[0] and "connection refused" in errors[0], errors
    assert f"connecting to the SuperLink at {address}" in res.stderr
    assert took < 120, took  # startup and the data check, plus 5 s of attempts and Flower's own shutdown


@pytest.mark.timeout(180)
def test_sigterm_to_client_run_stops_its_supernode(tmp_path):
    import os
    import signal

    from server import flwr_cli
    from tests.e2e.loopback import make_sites, wait_for

    site = make_sites(tmp_path / "data", 1)[0]
    log_file = tmp_path / "client.log"
    proc = flwr_cli.start([sys.executable, "-m", "client.run", "--data", str(site), "--superlink",
                           f"127.0.0.1:{flwr_cli.free_port()}", "--insecure", "--work", str(tmp_path / "work")],
                          flwr_cli.flower_env(), log_file, cwd=REPO)
    try:
        def supernodes():
            path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            kids = [int(p) for p in path.read_text().split()] if path.exists() else []
            return [k for k in kids if b"flower-supernode" in Path(f"/proc/{k}/cmdline").read_bytes()]

        child = wait_for(supernodes, 120, "the SuperNode child", details=lambda: log_file.read_text())[0]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_file.read_text()[-3000:]
        wait_for(lambda: not Path(f"/proc/{child}").exists() or b"Z" in Path(f"/proc/{child}/stat").read_bytes()
                 .split(b")")[-1][:3], 30, "the SuperNode to stop")
        assert "SIGTERM: stopping the SuperNode" in log_file.read_text()
    finally:
        flwr_cli.stop(proc, grace=1)
