"""A throwaway certificate authority and the certificates the locked-down test services
and their clients use (``tools/services.py --secure``).

Made with the ``openssl`` command (Debian's ``openssl``, installed when missing) rather
than a Python library: this module, like tools/services.py, runs before the project's
virtualenv exists. Keys are EC P-256, which ``openssl`` makes in milliseconds, and every
file is made again when one is missing or a certificate that should be valid expires
within a day; otherwise the files are reused, so services restarted in a run directory
keep trusting the clients that already hold its certificates.

Why each file exists (names relative to the directory):

``ca.pem`` / ``ca.key``
    The CA every server and client of a run directory trusts. Its key is kept only to
    sign the certificates below (and again when they are made again).
``server.pem`` / ``server.key``
    What each secure service presents: subject alternative names ``IP:127.0.0.1`` and
    ``DNS:localhost``, so hostname verification (``sslmode=verify-full``, MQTT's and
    AMQP's default checks) passes for either address.
``client.pem`` / ``client.key``
    The client certificate (CN ``energybus-worker``) that Mosquitto's
    ``require_certificate`` asks of every client.
``expired-client.pem`` / ``expired-client.key``
    Signed by the CA but no longer valid: a broker must refuse it.
``expired-server.pem`` / ``expired-server.key``
    The same for a server: a client must refuse to connect to a server presenting it.
``other-ca.pem`` / ``other-ca.key``
    A second CA that signed nothing here: a client that trusts only it must refuse the
    servers (the "wrong CA" case).

Keys are mode 0600. ``openssl ca`` (with the small configuration in ``openssl.cnf``)
signs the leaf certificates because it can back-date them: OpenSSL 3.0's ``x509 -req``
cannot set ``notBefore``. Its records (``index.txt``, ``serial``) live in ``signing/``.

    python3 tools/pki.py .run/pki    # makes (or reuses) the files, prints their paths
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = ["Pki", "PkiError", "make_pki"]

VALID_DAYS = 365
"""Lifetime of the CAs and the valid certificates: long enough for a demo run directory
that is kept for months; the check at reuse makes them again before they expire."""

CLIENT_CN = "energybus-worker"


class PkiError(RuntimeError):
    """The certificates could not be made; the message says which and why."""


@dataclass(frozen=True)
class Pki:
    """The files of a throwaway PKI (see the module's docstring for why each exists)."""

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_client_cert: Path
    expired_client_key: Path
    expired_server_cert: Path
    expired_server_key: Path
    other_ca: Path
    other_ca_key: Path

    @classmethod
    def at(cls, directory: Path) -> Pki:
        """The paths of a PKI in ``directory``, whether or not the files exist yet."""
        return cls(
            directory=directory,
            ca=directory / "ca.pem",
            ca_key=directory / "ca.key",
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
            expired_client_cert=directory / "expired-client.pem",
            expired_client_key=directory / "expired-client.key",
            expired_server_cert=directory / "expired-server.pem",
            expired_server_key=directory / "expired-server.key",
            other_ca=directory / "other-ca.pem",
            other_ca_key=directory / "other-ca.key",
        )

    def files(self) -> list[Path]:
        return [getattr(self, f.name) for f in fields(self) if f.name != "directory"]


# The CAs' own extensions, for ``req -x509``, and the leaves', for ``ca``; a config of
# our own so the system's openssl.cnf (its defaults differ between distributions) plays
# no part. Key usages as strict verifiers (Python 3.13's VERIFY_X509_STRICT, Erlang's
# ssl) expect them: the CA marked critical, each leaf with its key identifiers.
_CONFIG = """\
[ req ]
distinguished_name = dn
prompt = no
x509_extensions = ca_ext
[ dn ]
CN = unused
[ ca_ext ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[ ca ]
default_ca = throwaway
[ throwaway ]
dir = {signing}
database = $dir/index.txt
serial = $dir/serial
new_certs_dir = $dir
default_md = sha256
policy = any_name
unique_subject = no
email_in_dn = no
[ any_name ]
commonName = supplied
[ server_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ client_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is not None:
        return found
    try:
        from tools import services
    except ImportError:  # run as a script, beside services.py
        import services  # type: ignore[no-redef, import-not-found]
    try:
        services.apt_install("openssl")
    except services.ServiceError as failed:
        raise PkiError(f"openssl not found, and installing it failed: {failed}") from None
    found = shutil.which("openssl")
    if found is None:
        raise PkiError("openssl not found after installing Debian's openssl")
    return found


def _run(*args: str) -> None:
    result = subprocess.run([_openssl(), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise PkiError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _valid_for_a_day(cert: Path) -> bool:
    result = subprocess.run(
        [_openssl(), "x509", "-noout", "-checkend", "86400", "-in", str(cert)],
        capture_output=True,
    )
    return result.returncode == 0


def _reusable(pki: Pki) -> bool:
    if not all(path.is_file() for path in pki.files()):
        return False
    valid = (pki.ca, pki.other_ca, pki.server_cert, pki.client_cert)
    return all(_valid_for_a_day(cert) for cert in valid)


def _key(path: Path) -> None:
    path.unlink(missing_ok=True)
    # Created 0600 before openssl writes a byte of it.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def _ca(cert: Path, key: Path, name: str, config: Path) -> None:
    _key(key)
    _run(
        "req",
        "-x509",
        "-new",
        "-config",
        str(config),
        "-key",
        str(key),
        "-subj",
        f"/CN={name}",
        "-days",
        str(VALID_DAYS),
        "-out",
        str(cert),
    )


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%SZ")


def _leaf(
    pki: Pki, cert: Path, key: Path, name: str, extensions: str, config: Path, expired: bool
) -> None:
    _key(key)
    request = pki.directory / "signing" / "request.csr"
    _run(
        "req",
        "-new",
        "-config",
        str(config),
        "-key",
        str(key),
        "-subj",
        f"/CN={name}",
        "-out",
        str(request),
    )
    if expired:
        now = datetime.now(UTC)
        period = ["-startdate", _stamp(now - timedelta(days=30))]
        period += ["-enddate", _stamp(now - timedelta(days=1))]
    else:
        period = ["-days", str(VALID_DAYS)]
    _run(
        "ca",
        "-batch",
        "-notext",
        "-config",
        str(config),
        "-cert",
        str(pki.ca),
        "-keyfile",
        str(pki.ca_key),
        "-extensions",
        extensions,
        *period,
        "-in",
        str(request),
        "-out",
        str(cert),
    )
    request.unlink()


def _make(pki: Pki) -> None:
    signing = pki.directory / "signing"
    shutil.rmtree(signing, ignore_errors=True)
    signing.mkdir()
    (signing / "index.txt").write_text("")
    (signing / "serial").write_text(os.urandom(8).hex().upper() + "\n")
    config = signing / "openssl.cnf"
    config.write_text(_CONFIG.format(signing=signing))
    _ca(pki.ca, pki.ca_key, "energybus throwaway CA", config)
    _ca(pki.other_ca, pki.other_ca_key, "energybus other CA", config)
    leaves = [
        (pki.server_cert, pki.server_key, "localhost", "server_ext", False),
        (pki.client_cert, pki.client_key, CLIENT_CN, "client_ext", False),
        (pki.expired_server_cert, pki.expired_server_key, "localhost", "server_ext", True),
        (pki.expired_client_cert, pki.expired_client_key, CLIENT_CN, "client_ext", True),
    ]
    for cert, key, name, extensions, expired in leaves:
        _leaf(pki, cert, key, name, extensions, config, expired)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One maker at a time per directory: two test processes starting services in the
    same run directory must not sign with a CA the other is replacing."""
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def make_pki(directory: Path) -> Pki:
    """The PKI in ``directory``: its files reused when all exist and are valid for at
    least a day, else all made anew."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki.at(directory)
    with _locked(directory):
        if not _reusable(pki):
            _make(pki)
    return pki


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        pki = make_pki(args.directory)
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({name: str(path) for name, path in asdict(pki).items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
