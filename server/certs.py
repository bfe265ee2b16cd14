"""Test-federation credentials: a CA, a server TLS certificate, one ECDSA P-384 key pair per site (OpenSSH).

``python -m server.certs --out DIR --sites 3 [--host NAME ...]``; register the site keys on a running
SuperLink with ``python -m server.certs register DIR --superlink HOST:PORT`` (``flwr supernode register``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "histodiff test federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(out: Path, days: int = 365):
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("histodiff CA")).issuer_name(_name("histodiff CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_key(key, out / "ca.key")
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(out: Path, ca_key, ca_cert, hosts: list[str], days: int = 365) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", "::1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_key(key, out / "server.key")
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_site_key(out: Path, name: str) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / name
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (out / f"{name}.pub").write_bytes(public + f" {name}\n".encode())
    return private


def create(out: Path, sites: int, hosts: list[str] = ()) -> Path:
    out = Path(out)
    (out / "sites").mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(out)
    make_server_cert(out, ca_key, ca_cert, list(hosts))
    for i in range(sites):
        make_site_key(out / "sites", f"site{i}")
    return out


def site_public_keys(out: Path) -> list[Path]:
    return sorted((Path(out) / "sites").glob("*.pub"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["register"]:
        p = argparse.ArgumentParser(prog="python -m server.certs register")
        p.add_argument("dir")
        p.add_argument("--superlink", required=True)
        p.add_argument("--flwr-home", default=None)
        a = p.parse_args(argv[1:])
        from server.flwr_cli import register_keys, write_flwr_home

        home = write_flwr_home(Path(a.flwr_home or Path(a.dir) / "flwr-home"), a.superlink, Path(a.dir) / "ca.crt")
        register_keys(home, site_public_keys(Path(a.dir)))
        return 0
    p = argparse.ArgumentParser(prog="python -m server.certs", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--host", action="append", default=[], help="extra host name or IP for the server certificate")
    a = p.parse_args(argv)
    out = create(Path(a.out), a.sites, a.host)
    print(f"CA {out / 'ca.crt'}, server {out / 'server.pem'} + server.key, site keys in {out / 'sites'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
