"""``python -m server.run`` in deployment mode: bind address, advertised names, the certificate's names, and the
site command lines it prints. No Flower process is started here (tests/e2e/test_fed_loopback.py runs them)."""

from __future__ import annotations

import logging
import shlex

import pytest

from client import run as client_run
from server import certs, flwr_cli
from server import run as server_run
from server.run import AddressError, addresses, site_commands


def test_new_credentials_name_the_bind_address_and_the_advertised_names(tmp_path):
    folder = tmp_path / "c"
    assert addresses("127.0.0.2", [], folder, sites=2) == ["127.0.0.2"]
    names = certs.cert_names(folder / "server.pem")
    assert "127.0.0.2" in names and "127.0.0.1" in names
    assert sorted(p.name for p in (folder / "sites").glob("*.pub")) == ["site0.pub", "site1.pub"]

    other = tmp_path / "d"
    assert addresses("10.0.0.5", ["coordinator.example.org,fed.example.org"], other) == [
        "coordinator.example.org", "fed.example.org"]
    assert {"coordinator.example.org", "fed.example.org", "10.0.0.5"} <= set(certs.cert_names(other / "server.pem"))


def test_bind_all_needs_a_name_for_new_credentials(tmp_path):
    with pytest.raises(AddressError, match="--advertise"):
        addresses("0.0.0.0", [], tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert addresses("0.0.0.0", ["coordinator.example.org"], tmp_path / "c") == ["coordinator.example.org"]
    assert "0.0.0.0" not in certs.cert_names(tmp_path / "c" / "server.pem")
    # reused: the certificate's own non-loopback names are what sites connect to
    assert addresses("0.0.0.0", [], tmp_path / "c") == ["coordinator.example.org"]


@pytest.mark.parametrize("bind, advertise, missing", [
    ("127.0.0.2", [], "127.0.0.2"),                                # a localhost-only certificate, sites at .2
    ("0.0.0.0", ["coordinator.example.org"], "coordinator.example.org"),
    ("0.0.0.0", [], None),                                          # bind-all, certificate names only loopback
    ("127.0.0.1", ["127.0.0.3"], "127.0.0.3"),
])
def test_existing_certificate_that_does_not_name_the_address_is_refused(tmp_path, bind, advertise, missing):
    certs.create(tmp_path / "c", 1)  # localhost, 127.0.0.1, ::1 only
    with pytest.raises(AddressError) as err:
        addresses(bind, advertise, tmp_path / "c")
    msg = str(err.value)
    assert "\n" not in msg and "server.pem" in msg and "--server-cert" in msg
    if missing:
        assert f"does not name {missing}," in msg


def test_the_coordinators_own_connection_must_be_named_too(tmp_path):
    """Bound to one address, the coordinator's flwr commands and Flower's SuperExec connect to that address."""
    certs.create(tmp_path / "c", 1, ["coordinator.example.org"])
    with pytest.raises(AddressError, match="does not name 10.0.0.5, which the coordinator's own flwr"):
        addresses("10.0.0.5", ["coordinator.example.org"], tmp_path / "c")
    assert addresses("0.0.0.0", ["coordinator.example.org"], tmp_path / "c") == ["coordinator.example.org"]


def test_server_run_refuses_before_starting_anything(tmp_path, capsys):
    certs.create(tmp_path / "c", 1)
    run_dir = tmp_path / "run"
    code = server_run.main(["--run-dir", str(run_dir), "--certs", str(tmp_path / "c"), "--host", "127.0.0.2",
                            "--port", str(flwr_cli.free_port("127.0.0.2"))])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "does not name 127.0.0.2" in err[0]
    assert not (run_dir / "coordinator.json").exists() and not (run_dir / "logs" / "superlink.log").exists()


def test_loopback_bind_says_sites_elsewhere_cannot_connect(caplog):
    with caplog.at_level(logging.INFO, logger="histodiff.fed"):
        server_run._bind_notes("127.0.0.1", 9092, ["127.0.0.1"])
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "cannot reach" in warning and "--host 0.0.0.0" in warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="histodiff.fed"):
        server_run._bind_notes("0.0.0.0", 9092, ["coordinator.example.org"])
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "Control API" in text and "coordinator.example.org:9092" in text


def test_printed_site_commands_are_what_client_run_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = certs.create(tmp_path / "certs", 2)
    lines = site_commands("coordinator.example.org:9092", folder.resolve(), ["site0", "site1"], labeled={"site1"})
    assert lines[0] == ("python -m client.run --data /site/tiles --superlink coordinator.example.org:9092 "
                        "--root-certificates certs/ca.crt --auth-key certs/sites/site0 --site site0 --role unlabeled")
    argv = shlex.split(lines[1])
    assert argv[:3] == ["python", "-m", "client.run"]
    args = client_run.parse(argv[3:])
    assert (args.superlink, args.site, args.role, args.test_data) == ("coordinator.example.org:9092", "site1",
                                                                      "labeled", "/site/test")
    assert (tmp_path / args.root_certificates).is_file() and (tmp_path / args.auth_key).is_file()
    insecure = site_commands("[::1]:9092", None, [], ())
    assert client_run.parse(shlex.split(insecure[0])[3:]).insecure


def test_address_helpers():
    assert flwr_cli.connect_host("0.0.0.0") == "127.0.0.1" and flwr_cli.connect_host("::") == "::1"
    assert flwr_cli.connect_host("127.0.0.2") == "127.0.0.2"
    assert flwr_cli.hostport("::1", 9092) == "[::1]:9092" and flwr_cli.hostport("10.0.0.5", 1) == "10.0.0.5:1"
    assert flwr_cli.is_wildcard("0.0.0.0") and flwr_cli.is_wildcard("[::]") and not flwr_cli.is_wildcard("127.0.0.1")
    assert flwr_cli.free_port("127.0.0.2") > 0


def _readme_deployment_commands() -> list[list[str]]:
    """The README's "Federated pre-training (Flower)" bash block as argv lists (continuations joined)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Federated pre-training (Flower)"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python -m ")]


def test_readme_deployment_commands_fit_together(tmp_path, monkeypatch):
    """The README's coordinator commands: the certificate names the advertised host, and the site lines the
    coordinator prints are exactly the README's site commands."""
    monkeypatch.chdir(tmp_path)
    cmds = _readme_deployment_commands()
    certs_argv = next(c for c in cmds if c[2] == "server.certs")
    run_argv = next(c for c in cmds if c[2] == "server.run" and "--certs" in c)
    site_lines = [shlex.join(c) for c in cmds if c[2] == "client.run"]
    assert certs.main(certs_argv[3:]) == 0
    args = server_run.parse(run_argv[3:])
    assert args.host == "0.0.0.0" and args.advertise  # reachable from other machines
    advertised = addresses(args.host, args.advertise, (tmp_path / args.certs).resolve(), args.sites)
    keys = sorted((tmp_path / args.certs / "sites").glob("*.pub"))
    printed = site_commands(flwr_cli.hostport(advertised[0], args.port), (tmp_path / args.certs).resolve(),
                            [k.name[:-4] for k in keys], args.labeled_site)
    assert site_lines and all(line in printed for line in site_lines), (site_lines, printed)
