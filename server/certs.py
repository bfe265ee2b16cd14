"""Federation credentials: a CA, the SuperLink's TLS certificate, one ECDSA P-384 key pair per site (OpenSSH).

``python -m server.certs --out DIR --sites N --host NAME_OR_IP [--host ...]``
    A new folder: ``ca.key ca.crt server.key server.pem sites/site0 sites/site0.pub ...``. ``--host`` (repeatable,
    or comma lists: ``--host coordinator.example.org,10.0.0.5``) names every host name and IP address sites use to
    reach the coordinator; all of them go into the server certificate's subject alternative names, with
    ``localhost``, ``127.0.0.1`` and ``::1`` (the coordinator's own ``flwr`` commands). A site connecting by a name
    the certificate does not carry fails TLS verification, so without ``--host`` only this machine can connect.
``python -m server.certs --out DIR --add-site NAME [--add-site NAME ...]``
    An existing folder: creates the key pairs of the named sites that are missing (``site4``, or a comma list);
    existing keys, the CA and the server certificate are left as they are.
``python -m server.certs --out DIR --server-cert --host NAME_OR_IP ... [--force]``
    An existing folder: a new server certificate and key signed by its CA (``ca.key``), for other names.
``python -m server.certs register DIR --superlink HOST:PORT``
    Registers the site public keys on a running SuperLink (``flwr supernode register``).

Nothing is ever overwritten without ``--force``: a command that would replace a file stops first with a one-line
error naming it. ``--force`` on a new-folder command replaces the CA, the server certificate and the listed site
keys (every site then needs its new files and keys must be registered again). Private keys are created with
mode 0600 from the start (``O_CREAT | O_EXCL``); certificates and public keys are 0644. Keep ``ca.key`` offline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_DNS_LABEL = re.compile(r"(\*|[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)\Z")


class CredentialsError(Exception):
    """A one-line reason why the credentials command did nothing (or stopped before writing)."""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "histodiff test federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _show(path: Path) -> str:
    """``path`` as the user would type it: relative to the working directory where it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _write_new(path: Path, data: bytes, mode: int, force: bool = False) -> None:
    """Create ``path`` with ``mode`` in the one open call (no window with wider permissions); never overwrite
    unless ``force`` (then the old file is unlinked first, and a new inode gets ``mode``)."""
    if force:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise CredentialsError(f"{_show(path)} exists: pass --force to replace it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_private_key(key, path: Path, fmt: serialization.PrivateFormat, force: bool = False) -> None:
    _write_new(path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()), 0o600, force)


def _refuse_existing(paths: list[Path], hint: str) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise CredentialsError(f"{_show(path)} exists: {hint}")


def server_names(hosts=()) -> list[str]:
    """The server certificate's names: ``localhost``, ``127.0.0.1``, ``::1``, then ``hosts`` (comma lists
    allowed), without duplicates; an IP address in canonical form. Raises ``CredentialsError`` on a name that no
    client could connect by (a port, a URL, a bind-all address)."""
    names: list[str] = []
    for item in [*LOOPBACK_NAMES, *hosts]:
        for raw in str(item).split(","):
            host = raw.strip()
            if not host:
                continue
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                ip = None
            if ip is not None:
                if ip.is_unspecified:
                    raise CredentialsError(f"--host {host} is a bind-all address, not one sites connect to: "
                                           "name the coordinator's host name or IP address")
                host = str(ip)
            else:
                if ":" in host or "/" in host:
                    raise CredentialsError(f"--host {raw.strip()}: give a host name or IP address, without port "
                                           "or scheme")
                if not all(_DNS_LABEL.match(label) for label in host.rstrip(".").split(".")):
                    raise CredentialsError(f"--host {host} is not a valid host name or IP address")
                host = host.rstrip(".").lower()
            if host not in names:
                names.append(host)
    return names


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out: Path, days: int = 365, force: bool = False):
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("histodiff CA")).issuer_name(_name("histodiff CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_private_key(key, out / "ca.key", serialization.PrivateFormat.PKCS8, force)
    _write_new(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return key, cert


def make_server_cert(out: Path, ca_key, ca_cert, hosts=(), days: int = 365, force: bool = False) -> list[str]:
    """``server.key`` + ``server.pem`` for ``server_names(hosts)``; returns those names."""
    names = server_names(hosts)
    extra = names[len(LOOPBACK_NAMES):]
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(extra[0] if extra else "localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private_key(key, out / "server.key", serialization.PrivateFormat.PKCS8, force)
    _write_new(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return names


def make_site_key(out: Path, name: str, force: bool = False) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    if not SITE_NAME.match(name) or name.endswith(".pub"):
        raise CredentialsError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (e.g. site4)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / name
    _write_private_key(key, private, serialization.PrivateFormat.OpenSSH, force)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_new(out / f"{name}.pub", public + f" {name}\n".encode(), 0o644, force)
    return private


def _site_files(out: Path, names) -> list[Path]:
    return [p for n in names for p in (out / "sites" / n, out / "sites" / f"{n}.pub")]


def create(out: Path, sites: int, hosts=(), force: bool = False, days: int = 365) -> Path:
    """A new credentials folder (CA, server certificate for ``hosts``, keys ``site0`` ... ``site{sites-1}``).

    Without ``force`` nothing is written when any of those files exists (``CredentialsError`` names it)."""
    out = Path(out)
    server_names(hosts)  # a bad name fails before anything is written
    names = [f"site{i}" for i in range(sites)]
    if not force:
        _refuse_existing([out / "ca.key", out / "ca.crt", out / "server.key", out / "server.pem",
                          *_site_files(out, names)],
                         "pass --force to replace the CA, the server certificate and the site keys, "
                         "or --add-site NAME / --server-cert to add to this CA")
    (out / "sites").mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(out, days, force)
    make_server_cert(out, ca_key, ca_cert, hosts, days, force)
    for name in names:
        make_site_key(out / "sites", name, force)
    return out


def _require_ca(out: Path, need_key: bool) -> None:
    for path in [out / "ca.crt"] + ([out / "ca.key"] if need_key else []):
        if not path.is_file():
            raise CredentialsError(f"{_show(path)} not found: create the folder first "
                                   f"(python -m server.certs --out {_show(out)} --sites N --host NAME)")


def add_sites(out: Path, names) -> tuple[list[str], list[str]]:
    """Key pairs for the named sites (comma lists allowed) that have none in ``out/sites``; returns (created,
    kept). Needs the folder's CA certificate (the folder is one federation); touches nothing else."""
    out = Path(out)
    _require_ca(out, need_key=False)
    wanted = list(dict.fromkeys(n.strip() for item in names for n in str(item).split(",") if n.strip()))
    for name in wanted:
        if not SITE_NAME.match(name) or name.endswith(".pub"):
            raise CredentialsError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (e.g. site4)")
        private, public = _site_files(out, [name])
        if private.exists() != public.exists():
            raise CredentialsError(f"{_show(public if private.exists() else private)} is missing but its pair "
                                   "exists: remove the other half or restore it")
    (out / "sites").mkdir(parents=True, exist_ok=True)
    created, kept = [], []
    for name in wanted:
        if (out / "sites" / name).exists():
            kept.append(name)
        else:
            make_site_key(out / "sites", name)
            created.append(name)
    return created, kept


def reissue_server_cert(out: Path, hosts=(), force: bool = False, days: int = 365) -> list[str]:
    """A new ``server.pem``/``server.key`` signed by ``out``'s CA for ``hosts``; returns the certificate's names."""
    out = Path(out)
    server_names(hosts)
    _require_ca(out, need_key=True)
    if not force:
        _refuse_existing([out / "server.key", out / "server.pem"], "pass --force to replace it")
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    return make_server_cert(out, ca_key, ca_cert, hosts, days, force)


def cert_names(pem: Path) -> list[str]:
    """The subject alternative names (host names and IP addresses) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(Path(pem).read_bytes())
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def covers(names, host: str) -> bool:
    """Whether a certificate with SANs ``names`` verifies for a client connecting to ``host`` (RFC 6125: an IP
    address matches only an IP SAN; a name matches a DNS SAN exactly or one leading ``*.`` label)."""
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        for name in names:
            try:
                if ipaddress.ip_address(name) == ip:
                    return True
            except ValueError:
                continue
        return False
    host = host.rstrip(".").lower()
    for name in names:
        name = name.rstrip(".").lower()
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:] and host.split(".", 1)[0]:
            return True
    return False


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
    p = argparse.ArgumentParser(prog="python -m server.certs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="credentials folder")
    p.add_argument("--sites", type=int, default=None, help="new folder: site keys site0 ... site{N-1} (default 3)")
    p.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a host name or IP address sites reach the coordinator by (repeatable, or comma lists); "
                        "all go into the server certificate, with localhost, 127.0.0.1 and ::1")
    p.add_argument("--add-site", action="append", default=[], metavar="NAME",
                   help="existing folder: create the key pair of this site if it has none (repeatable, comma lists)")
    p.add_argument("--server-cert", action="store_true",
                   help="existing folder: issue a new server certificate for --host with the folder's CA")
    p.add_argument("--days", type=int, default=365, help="validity of new certificates")
    p.add_argument("--force", action="store_true", help="replace files that exist (never done without it)")
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        if a.add_site or a.server_cert:
            if a.sites is not None:
                raise CredentialsError("--sites creates a new folder; add keys to an existing one with --add-site NAME")
            if a.host and not a.server_cert:
                raise CredentialsError("--host with --add-site changes nothing: add --server-cert (and --force) "
                                       "to re-issue the server certificate")
            if a.server_cert:
                names = reissue_server_cert(out, a.host, a.force, a.days)
                print(f"server certificate {_show(out / 'server.pem')} + server.key for {', '.join(names)}")
            if a.add_site:
                created, kept = add_sites(out, a.add_site)
                print(f"site keys in {_show(out / 'sites')}: created {', '.join(created) or 'none'}"
                      + (f"; kept existing {', '.join(kept)}" if kept else ""))
            return 0
        sites = 3 if a.sites is None else a.sites
        create(out, sites, a.host, a.force, a.days)
    except CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = f"site keys site0 ... site{sites - 1} in {_show(out / 'sites')}" if sites else "no site keys"
    print(f"CA {_show(out / 'ca.crt')}, server {_show(out / 'server.pem')} + server.key for "
          f"{', '.join(server_names(a.host))}; {keys}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
