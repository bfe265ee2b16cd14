"""``python -m server.certs``: names in the server certificate, no silent overwrites, adding site keys to an
existing CA, private keys created 0600 (no chmod window)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from server import certs
from server.certs import CredentialsError, cert_names, covers, main

PRIVATE = ("ca.key", "server.key", "sites/site0", "sites/site1")


def _sans(pem: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _verifies(ca: Path, pem: Path) -> bool:
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    try:
        cert.verify_directly_issued_by(ca_cert)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_hosts_repeatable_and_comma_lists_all_in_the_sans(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["--out", str(out), "--sites", "2", "--host", "coordinator.example.org",
                 "--host", "10.0.0.5, fed.hospital.example", "--host", "127.0.0.2", "--host", "fe80::1"]) == 0
    dns, ips = _sans(out / "server.pem")
    assert dns == {"localhost", "coordinator.example.org", "fed.hospital.example"}
    assert ips == {"127.0.0.1", "::1", "10.0.0.5", "127.0.0.2", "fe80::1"}  # IPs as IP SANs, not DNS names
    assert _verifies(out / "ca.crt", out / "server.pem")
    assert "coordinator.example.org" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["site0", "site0.pub", "site1", "site1.pub"]


def test_without_host_only_this_machine_is_named(tmp_path):
    certs.create(tmp_path / "c", 1)
    assert cert_names(tmp_path / "c" / "server.pem") == ["localhost", "127.0.0.1", "::1"]
    assert not covers(cert_names(tmp_path / "c" / "server.pem"), "127.0.0.2")


@pytest.mark.parametrize("bad", ["coordinator:9092", "https://coordinator", "0.0.0.0", "::", "bad name"])
def test_a_name_no_site_could_connect_by_is_refused_before_writing(tmp_path, capsys, bad):
    assert main(["--out", str(tmp_path / "c"), "--host", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host") and "\n" not in err
    assert not (tmp_path / "c").exists()


def test_existing_ca_or_key_is_never_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["--out", str(out), "--sites", "2"]) == 0
    before = _snapshot(out)
    assert main(["--out", str(out), "--sites", "2", "--host", "coordinator.example.org"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "ca.key exists" in err and "--force" in err
    assert _snapshot(out) == before  # nothing written, not even the files that did not collide

    (out / "ca.key").unlink()  # a lone CA certificate is still a CA: refused, naming it
    assert main(["--out", str(out), "--sites", "2"]) == 2
    assert "ca.crt exists" in capsys.readouterr().err

    assert main(["--out", str(out), "--sites", "2", "--host", "coordinator.example.org", "--force"]) == 0
    after = _snapshot(out)
    assert all(after[name] != before[name] for name in ("ca.crt", "server.pem", "sites/site0", "sites/site1.pub"))
    assert "coordinator.example.org" in _sans(out / "server.pem")[0]
    assert _verifies(out / "ca.crt", out / "server.pem")


def test_a_site_key_alone_blocks_a_new_folder(tmp_path, capsys):
    (tmp_path / "c" / "sites").mkdir(parents=True)
    (tmp_path / "c" / "sites" / "site1").write_text("someone's key")
    assert main(["--out", str(tmp_path / "c"), "--sites", "3"]) == 2
    assert "site1 exists" in capsys.readouterr().err
    assert not (tmp_path / "c" / "ca.key").exists()
    assert (tmp_path / "c" / "sites" / "site1").read_text() == "someone's key"


def test_add_site_creates_only_the_missing_keys(tmp_path, capsys):
    out = tmp_path / "certs"
    certs.create(out, 2)
    before = _snapshot(out)
    assert main(["--out", str(out), "--add-site", "site1", "--add-site", "site2,site3"]) == 0
    msg = capsys.readouterr().out
    assert "created site2, site3" in msg and "kept existing site1" in msg
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before  # CA, server certificate, site0 and site1 untouched
    assert set(after) - set(before) == {"sites/site2", "sites/site2.pub", "sites/site3", "sites/site3.pub"}
    key = serialization.load_ssh_private_key(after["sites/site3"], password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert after["sites/site3.pub"].startswith(b"ecdsa-sha2-nistp384 ") and after["sites/site3.pub"].endswith(b" site3\n")
    assert stat.S_IMODE(os.stat(out / "sites" / "site3").st_mode) == 0o600
    assert main(["--out", str(out), "--add-site", "site3"]) == 0  # again: nothing to do, nothing replaced
    assert _snapshot(out) == after


def test_add_site_needs_an_existing_ca_and_a_plain_name(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "none"), "--add-site", "site4"]) == 2
    assert "ca.crt not found" in capsys.readouterr().err
    certs.create(tmp_path / "c", 1)
    for bad in ("../evil", "site4.pub", ".hidden"):
        assert main(["--out", str(tmp_path / "c"), "--add-site", bad]) == 2
        assert "site name" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "c"), "--add-site", "site4", "--sites", "5"]) == 2
    assert "--add-site" in capsys.readouterr().err


def test_server_cert_reissued_for_new_names_under_the_same_ca(tmp_path, capsys):
    out = tmp_path / "certs"
    certs.create(out, 1)
    before = _snapshot(out)
    assert main(["--out", str(out), "--server-cert", "--host", "127.0.0.2"]) == 2
    assert "server.key exists" in capsys.readouterr().err and _snapshot(out) == before
    assert main(["--out", str(out), "--server-cert", "--host", "127.0.0.2", "--force"]) == 0
    after = _snapshot(out)
    assert after["ca.crt"] == before["ca.crt"] and after["ca.key"] == before["ca.key"]
    assert after["sites/site0"] == before["sites/site0"] and after["server.key"] != before["server.key"]
    assert "127.0.0.2" in _sans(out / "server.pem")[1] and _verifies(out / "ca.crt", out / "server.pem")
    assert stat.S_IMODE(os.stat(out / "server.key").st_mode) == 0o600


def test_private_keys_are_0600_from_creation_without_chmod(tmp_path, monkeypatch):
    """Created with mode 0600 by the open call itself: no chmod afterwards (which would leave a window with the
    umask's wider mode); a permissive umask changes nothing."""
    def no_chmod(*a, **k):
        raise AssertionError("chmod called: the key existed with another mode before")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old = os.umask(0)
    try:
        certs.create(tmp_path / "c", 2)
        certs.add_sites(tmp_path / "c", ["site5"])
    finally:
        os.umask(old)
    for name in (*PRIVATE, "sites/site5"):
        assert stat.S_IMODE(os.stat(tmp_path / "c" / name).st_mode) == 0o600, name
    for name in ("ca.crt", "server.pem", "sites/site0.pub"):
        assert stat.S_IMODE(os.stat(tmp_path / "c" / name).st_mode) == 0o644, name


def test_key_writer_refuses_an_existing_file_or_link(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    for path in (target, tmp_path / "link"):
        with pytest.raises(CredentialsError, match="exists"):
            certs._write_new(path, b"secret", 0o600)
    assert target.read_text() == "keep"


@pytest.mark.parametrize("host, ok", [("coordinator.example.org", True), ("COORDINATOR.example.org.", True),
                                      ("a.wild.example", True), ("b.a.wild.example", False), ("wild.example", False),
                                      ("10.0.0.5", True), ("10.0.0.6", False), ("::1", True), ("[::1]", True),
                                      ("localhost", True), ("127.0.0.2", False)])
def test_covers_follows_tls_name_matching(host, ok):
    names = certs.server_names(["coordinator.example.org", "*.wild.example", "10.0.0.5"])
    assert covers(names, host) is ok
