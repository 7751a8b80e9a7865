"""Start and stop the real services energybus talks to, for tests and the local demo.

Mosquitto, PostgreSQL and RabbitMQ come from Debian's packages (installed with apt-get
when missing), run as plain child processes on loopback ports, keep their data under a
project-local run directory, and are stopped by the PID this module recorded: cleanly
(PostgreSQL with its fast shutdown), or on purpose abruptly with ``crash`` for tests of
faults. Nothing touches the system's own service instances or their configuration.
Node-RED, for the benchmark beside it, comes with its own Node.js from the npm registry
(tools/nodered.py).

With ``secure`` (``up --secure``) each server is locked down as a site would run it:
TLS only, with certificates of a throwaway CA (tools/pki.py, made in ``<run_dir>/pki``),
and passwords generated per run directory, which :func:`credentials` reads and nothing
prints. A run directory holds either plain or secure services, never both.

Standard library only, so it runs before the project's virtualenv exists::

    python3 tools/services.py up mosquitto postgres --run-dir .run
    python3 tools/services.py up --secure mosquitto --run-dir .run/secure
    python3 tools/services.py status
    python3 tools/services.py crash postgres   # SIGKILL: the next start recovers
    python3 tools/services.py down
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    from tools import nodered, pki
except ImportError:  # python3 tools/services.py: tools/ itself is sys.path[0]
    import nodered  # type: ignore[no-redef, import-not-found]
    import pki  # type: ignore[no-redef, import-not-found]

__all__ = [
    "SERVICES",
    "Service",
    "ServiceError",
    "apt_install",
    "crash",
    "credentials",
    "free_port",
    "mosquitto_users",
    "pki_of",
    "rabbitmq_tenants",
    "rabbitmqctl",
    "running",
    "start",
    "started",
    "stop",
]

DEFAULT_RUN_DIR = Path(__file__).resolve().parent.parent / ".run"
DEFAULT_PORTS = {"mosquitto": 18830, "postgres": 15432, "rabbitmq": 15672, "nodered": 18880}
HOST = "127.0.0.1"
# How a service is asked to stop cleanly, when not with SIGTERM. PostgreSQL takes SIGTERM
# as a "smart" shutdown, which waits for every client to disconnect; SIGINT is its fast
# shutdown, which disconnects them, writes a shutdown checkpoint and exits.
STOP_SIGNALS = {"postgres": signal.SIGINT}
SECURE = ("mosquitto", "postgres", "rabbitmq")
"""The services with a secure mode."""


class ServiceError(RuntimeError):
    """A service could not be installed, started or stopped; the message says which and why."""


@dataclass(frozen=True)
class Service:
    """A running service: enough to connect to it and to stop it."""

    name: str
    host: str
    port: int
    pid: int
    run_dir: str
    url: str
    secure: bool = False
    """Locked down: TLS only, passwords (:func:`credentials`), no guest or anonymous."""

    def state_file(self) -> Path:
        return _state_file(Path(self.run_dir), self.name)


def _record(service: Service) -> dict[str, Any]:
    """The service as ``service.json`` and ``up`` give it; a plain service's record is
    what it was before the secure mode existed."""
    record = asdict(service)
    if not service.secure:
        del record["secure"]
    return record


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: connections in TIME_WAIT from a stopped server must not
        # keep it from starting again on its port; a listener still makes bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _state_file(run_dir: Path, name: str) -> Path:
    return run_dir / name / "service.json"


def apt_install(*packages: str) -> None:
    """Install Debian packages, as root or through sudo, without prompts."""
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ServiceError(f"{' '.join(packages)} missing; install them (not root, no sudo)")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True).returncode == 0:
        return
    subprocess.run([*prefix, "apt-get", "update", "-qq"], env=env, check=False)
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"apt-get install {' '.join(packages)} failed:\n{result.stderr}")


def _require(binary: str, *packages: str) -> str:
    found = shutil.which(binary) or next(
        (str(p) for p in (Path("/usr/sbin") / binary, Path("/usr/bin") / binary) if p.exists()),
        None,
    )
    if found is None:
        apt_install(*packages)
        found = shutil.which(binary) or str(Path("/usr/sbin") / binary)
    if not Path(found).exists():
        raise ServiceError(f"{binary} not found after installing {' '.join(packages)}")
    return found


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(
                f"exited with status {process.returncode} while starting; log {log}:\n{_tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise ServiceError(f"did not listen on {HOST}:{port} within {timeout:.0f}s; log {log}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _as_service_user(user: str) -> list[str]:
    """Servers that refuse to run as root run as their Debian system user."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def _data_dir(run_dir: Path, name: str, user: str) -> Path:
    """Where a server keeps its data: ``<run_dir>/<name>`` when its system user can reach it.

    As root, servers run as their own users; a checkout under a private home (``/root``)
    is out of their reach, so their data then goes to a directory of the same name under
    the system's temporary directory instead.
    """
    data = run_dir / name
    data.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and not _can_enter(user, data):
        digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
        data = Path(tempfile.gettempdir()) / f"energybus-{digest}" / name
        data.mkdir(parents=True, exist_ok=True)
        data.parent.chmod(0o755)
    _chown_for(user, data)
    return data


def _can_enter(user: str, path: Path) -> bool:
    probe = subprocess.run(
        ["runuser", "-u", user, "--", "test", "-x", str(path.parent)], capture_output=True
    )
    return probe.returncode == 0


def _chown_for(user: str, *paths: Path) -> None:
    if os.geteuid() == 0:
        for path in paths:
            shutil.chown(path, user, user)


def _credentials_file(run_dir: Path, name: str) -> Path:
    return run_dir / name / "credentials.json"


def _save_credentials(run_dir: Path, name: str, secrets_: Mapping[str, str]) -> None:
    """Written 0600 from its first byte, and replaced whole: a reader never sees half."""
    path = _credentials_file(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(dict(secrets_), out)
    partial.replace(path)


def _load_credentials(run_dir: Path, name: str) -> dict[str, str] | None:
    try:
        loaded = json.loads(_credentials_file(run_dir, name).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"{_credentials_file(run_dir, name)} unreadable: {exc}") from None
    return {str(user): str(password) for user, password in loaded.items()}


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def credentials(service: Service) -> dict[str, str]:
    """The generated secrets of a secure ``service``: Mosquitto's users and their
    passwords, PostgreSQL's superuser ``energybus`` and its password, none for RabbitMQ
    (``rabbitmqctl`` authenticates with the node's Erlang cookie). The same for every
    start in one run directory; kept 0600 in ``<run_dir>/<name>/credentials.json``,
    never in ``service.json`` nor in the URL."""
    if not service.secure:
        raise ServiceError(f"{service.name} on port {service.port} is not secure: no credentials")
    found = _load_credentials(Path(service.run_dir), service.name)
    if found is None:
        raise ServiceError(f"{service.name}: no credentials under {service.run_dir}")
    return found


def _check_mode(run_dir: Path, name: str, secure: bool, plain_data: Path) -> None:
    """A server whose data outlives its configuration (PostgreSQL's roles and password
    method, RabbitMQ's users) stays what its first start made it: secure exactly when
    its credentials exist. ``plain_data`` is what a plain first start leaves."""
    has_credentials = _credentials_file(run_dir, name).exists()
    if secure and not has_credentials and plain_data.exists():
        raise ServiceError(
            f"{run_dir} holds a plain {name}; a secure one needs a run directory of its own"
        )
    if not secure and has_credentials:
        raise ServiceError(
            f"{run_dir} holds a secure {name}: start it with secure=True (up --secure)"
        )


def pki_of(service: Service) -> pki.Pki:
    """The certificates of a secure service's run directory: its CA, a client
    certificate and the rest that tests need (tools/pki.py)."""
    return _make_pki(Path(service.run_dir))


def _make_pki(run_dir: Path) -> pki.Pki:
    try:
        return pki.make_pki(run_dir / "pki")
    except pki.PkiError as exc:
        raise ServiceError(str(exc)) from None


def _tls_files(run_dir: Path, data: Path, user: str) -> tuple[Path, Path, Path]:
    """The CA, server certificate and key, copied where the server's own user owns them:
    PostgreSQL refuses a key file that is not its own (or root's) with mode 0600, and a
    server that drops root (Mosquitto) reads them again at a reload."""
    made = _make_pki(run_dir)
    tls = data / "tls"
    tls.mkdir(mode=0o700, exist_ok=True)
    copies = []
    for source, target in (
        (made.ca, "ca.pem"),
        (made.server_cert, "server.pem"),
        (made.server_key, "server.key"),
    ):
        copy = tls / target
        shutil.copyfile(source, copy)
        copy.chmod(0o600)
        copies.append(copy)
    _chown_for(user, tls, *copies)
    return copies[0], copies[1], copies[2]


def _mosquitto_files(data: Path, users: Mapping[str, str], acl: str) -> None:
    """The password file (hashed by ``mosquitto_passwd``) and ACL file of ``users``."""
    for user in users:
        if not user or any(c in user for c in ":\n\r") or user != user.strip():
            raise ServiceError(f"mosquitto: user name {user!r} cannot go in a password file")
    passwd = _require("mosquitto_passwd", "mosquitto")
    passwords = data / "passwords"
    staged = data / ".passwords"
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    # One user at a time with -b: `-U` over a file of user:password lines cuts a password
    # at a colon. The password is on this throwaway broker's command line for a moment.
    for user, password in users.items():
        if any(c in password for c in "\n\r"):
            staged.unlink(missing_ok=True)
            raise ServiceError(f"mosquitto: the password of {user!r} cannot hold a line break")
        result = subprocess.run(
            [passwd, "-b", str(staged), user, password], capture_output=True, text=True
        )
        if result.returncode != 0:
            staged.unlink(missing_ok=True)
            # Its messages name the file, never a password.
            raise ServiceError(f"mosquitto_passwd failed: {result.stderr.strip()}")
    staged_acl = data / ".acl"
    staged_acl.write_text(acl if acl.endswith("\n") or not acl else acl + "\n")
    staged_acl.chmod(0o600)
    _chown_for("mosquitto", staged, staged_acl)
    staged.replace(passwords)
    staged_acl.replace(data / "acl")


DEFAULT_MOSQUITTO_ACL = "user admin\ntopic readwrite #\n"
"""A secure Mosquitto's ACL until :func:`mosquitto_users` installs another."""


def mosquitto_users(service: Service, users: Mapping[str, str], acl: str) -> None:
    """Make ``users`` (``name: password``) exactly the users of the secure Mosquitto
    ``service``, ``acl`` its whole ACL file (Mosquitto's ``acl_file`` format), and have it
    reload both (SIGHUP); returns once it has. :func:`credentials` then gives these
    users, and later starts in the run directory keep them and the ACL."""
    if service.name != "mosquitto" or not service.secure:
        plain = "" if service.secure else "plain "
        raise ServiceError(f"mosquitto_users needs a secure mosquitto, not a {plain}{service.name}")
    run_dir = Path(service.run_dir)
    data = _data_dir(run_dir, "mosquitto", "mosquitto")
    _mosquitto_files(data, users, acl)
    _save_credentials(run_dir, "mosquitto", users)
    _reload_mosquitto(service, data / "mosquitto.log")


def _reload_mosquitto(service: Service, log: Path, timeout: float = 10) -> None:
    """SIGHUP, then wait for the broker's "Reloading config." (logged at ``information``
    level): it reads the password and ACL files in the same turn of its loop, before it
    serves any client again. Errors it logs after that line are the files' errors."""
    marker = "Reloading config."
    before = log.read_text(errors="replace").count(marker) if log.exists() else 0
    os.kill(service.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count(marker) > before:
            after = text.rsplit(marker, 1)[1]
            errors = [line for line in after.splitlines() if ": Error: " in line]
            if errors:
                raise ServiceError("mosquitto reloaded with errors:\n" + "\n".join(errors))
            return
        time.sleep(0.02)
    raise ServiceError(f"mosquitto did not reload within {timeout:.0f}s; log {log}")


def _start_mosquitto(
    run_dir: Path, port: int, *, secure: bool = False, acl: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    binary = _require("mosquitto", "mosquitto", "mosquitto-clients")
    data = _data_dir(run_dir, "mosquitto", "mosquitto")
    log = data / "mosquitto.log"
    conf = data / "mosquitto.conf"
    listener = f"listener {port} {HOST}\nallow_anonymous true\n"
    logged = "log_type error\nlog_type warning\nlog_type notice\n"
    if acl is not None and not secure:
        (data / "acl").write_text(acl)
        _chown_for("mosquitto", data / "acl")
        listener += f"acl_file {data / 'acl'}\n"
    if secure:
        # One TLS listener and nothing else: every client shows a certificate of the run
        # directory's CA, then a user name and password; the ACL says what each may do.
        # The users and ACL of an earlier start (mosquitto_users') stay, unless ``acl``.
        users = _load_credentials(run_dir, "mosquitto")
        if users is None:
            users = {"admin": _new_password()}
            _save_credentials(run_dir, "mosquitto", users)
            (data / "acl").unlink(missing_ok=True)
        if acl is None:
            acl = (data / "acl").read_text() if (data / "acl").exists() else DEFAULT_MOSQUITTO_ACL
        _mosquitto_files(data, users, acl)
        ca, cert, key = _tls_files(run_dir, data, "mosquitto")
        listener = (
            f"listener {port} {HOST}\n"
            f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
            "require_certificate true\n"
            "tls_version tlsv1.2\n"
            "allow_anonymous false\n"
            f"password_file {data / 'passwords'}\n"
            f"acl_file {data / 'acl'}\n"
        )
        # "Reloading config." is at this level: mosquitto_users waits for it.
        logged += "log_type information\n"
    # As a production broker would run (docs/worker.md, "Broker settings"). Persistence,
    # saved every 5 minutes and at a clean stop (SIGTERM): each save rewrites the whole
    # file, so saving every second rewrites everything queued every second. Queues
    # bounded per client, whichever bound comes first: 256 MiB is ~40 s of a worker's
    # source session at 2,000 VEN messages/s of 3 KB (its own canonical output is never
    # queued for it: No Local); 200,000 canonical values (~30 MB) are 2 s of the whole
    # bus at that rate for another subscriber. Sessions that ask never to expire go after
    # 14 days, longer than any session the worker asks for.
    conf.write_text(
        f"{listener}"
        "persistence true\n"
        f"persistence_location {data}/\n"
        "autosave_interval 300\n"
        f"log_dest file {log}\n"
        f"{logged}"
        "max_queued_messages 200000\n"
        "max_queued_bytes 268435456\n"
        "max_inflight_messages 0\n"
        "persistent_client_expiration 14d\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _wait_for_port(port, process, 15, log)
    return process, f"{'mqtts' if secure else 'mqtt'}://{HOST}:{port}"


def _postgres_bin() -> Path:
    roots = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not roots:
        apt_install("postgresql")
        roots = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not roots:
        raise ServiceError("PostgreSQL binaries not found under /usr/lib/postgresql")
    return roots[0].parent


def _start_postgres(
    run_dir: Path, port: int, *, secure: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    bindir = _postgres_bin()
    base = _data_dir(run_dir, "postgres", "postgres")
    data = base / "data"
    as_pg = _as_service_user("postgres")
    log = base / "postgres.log"
    _check_mode(run_dir, "postgres", secure, data / "PG_VERSION")
    password = None
    if secure:
        found = _load_credentials(run_dir, "postgres")
        if found is None:
            found = {"energybus": _new_password()}
            _save_credentials(run_dir, "postgres", found)
        password = found["energybus"]
    pwfile = base / ".initdb-password"
    if not (data / "PG_VERSION").exists():
        if password is None:
            # Trust on loopback only: a throwaway cluster for tests and the demo.
            auth = ["--auth=trust"]
        else:
            # The superuser's password, for initdb to read; gone once it has.
            pwfile.unlink(missing_ok=True)
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(password + "\n")
            _chown_for("postgres", pwfile)
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            result = subprocess.run(
                [
                    *as_pg,
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "energybus",
                    *auth,
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                capture_output=True,
                text=True,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stderr}")
    server = [str(bindir / "postgres"), "-D", str(data), "-p", str(port)]
    settings = {"listen_addresses": HOST, "unix_socket_directories": str(base)}
    client_env = dict(os.environ)
    if password is not None:
        # Over TLS with a password only: no line for plain TCP, none for the socket.
        hba = data / "pg_hba.conf"
        hba.write_text(
            "# tools/services.py --secure: TLS and a SCRAM password, from loopback only\n"
            f"hostssl all all {HOST}/32 scram-sha-256\n"
        )
        _chown_for("postgres", hba)
        _, cert_file, key_file = _tls_files(run_dir, base, "postgres")
        settings |= {
            "ssl": "on",
            "ssl_cert_file": str(cert_file),
            "ssl_key_file": str(key_file),
            "ssl_min_protocol_version": "TLSv1.2",
            "password_encryption": "scram-sha-256",
        }
        client_env |= {
            "PGPASSWORD": password,
            "PGSSLMODE": "verify-full",
            "PGSSLROOTCERT": str(_make_pki(run_dir).ca),
        }
    with log.open("ab") as output:
        process = subprocess.Popen(
            [*as_pg, *server, *(f"--{key}={value}" for key, value in settings.items())],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_for_port(port, process, 30, log)
    for _ in range(100):
        result = subprocess.run(
            [
                str(bindir / "psql"),
                "-h",
                HOST,
                "-p",
                str(port),
                "-U",
                "energybus",
                "-d",
                "postgres",
                "-tAc",
                "SELECT 1 FROM pg_database WHERE datname='energybus'",
            ],
            capture_output=True,
            text=True,
            env=client_env,
        )
        if result.returncode == 0:
            break
        time.sleep(0.1)
    if result.stdout.strip() != "1":
        subprocess.run(
            [str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", "energybus", "energybus"],
            check=True,
            capture_output=True,
            env=client_env,
        )
    return process, f"postgresql://energybus@{HOST}:{port}/energybus"


def _start_rabbitmq(
    run_dir: Path, port: int, *, secure: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    binary = _require("rabbitmq-server", "rabbitmq-server")
    base = _data_dir(run_dir, "rabbitmq", "rabbitmq")
    log = base / "rabbitmq.log"
    _check_mode(run_dir, "rabbitmq", secure, base / "mnesia")
    dist_port = free_port()
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": f"energybus-{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "ERL_EPMD_ADDRESS": HOST,
    }
    (base / "enabled_plugins").write_text("[].\n")
    conf = "loopback_users = none\n"
    if secure:
        # Credentials first: they mark the node secure before it has any data.
        _save_credentials(run_dir, "rabbitmq", {})
        # The node's port is its TLS listener, and no plain one is opened.
        del env["RABBITMQ_NODE_IP_ADDRESS"], env["RABBITMQ_NODE_PORT"]
        ca, cert, key = _tls_files(run_dir, base, "rabbitmq")
        conf = (
            "listeners.tcp = none\n"
            f"listeners.ssl.default = {HOST}:{port}\n"
            f"ssl_options.cacertfile = {ca}\n"
            f"ssl_options.certfile = {cert}\n"
            f"ssl_options.keyfile = {key}\n"
            # A client certificate is checked when one is shown; AMQP clients
            # authenticate with their user's password.
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
    (base / "rabbitmq.conf").write_text(conf)
    _chown_for("rabbitmq", base / "enabled_plugins", base / "rabbitmq.conf")
    # runuser resets HOME, where Erlang keeps its cookie: give the node a private one.
    with log.open("ab") as output:
        process = subprocess.Popen(
            [*_as_service_user("rabbitmq"), "env", f"HOME={base}", binary],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _wait_for_port(port, process, 90, log)
    if not secure:
        return process, f"amqp://guest:guest@{HOST}:{port}/"
    # RabbitMQ makes guest at its first start; a locked-down node has only the users
    # rabbitmq_tenants gives it.
    service = Service("rabbitmq", HOST, port, process.pid, str(run_dir), "", secure=True)
    try:
        rabbitmqctl(service, "delete_user", "guest")
    except ServiceError as exc:
        if "does not exist" not in str(exc):
            raise
    return process, f"amqps://{HOST}:{port}/"


def rabbitmqctl(service: Service, *args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl`` against the node ``service`` runs (its name and Erlang cookie
    are private to the run directory); its output, or ServiceError with it."""
    if service.name != "rabbitmq":
        raise ServiceError(f"rabbitmqctl talks to rabbitmq, not {service.name}")
    binary = _require("rabbitmqctl", "rabbitmq-server")
    base = _data_dir(Path(service.run_dir), "rabbitmq", "rabbitmq")
    env = {**os.environ, "ERL_EPMD_ADDRESS": HOST}
    # Debian's rabbitmqctl sets HOME itself, so the node's private cookie is passed on.
    cookie = (base / ".erlang.cookie").read_text().strip()
    command = [
        binary,
        "-q",
        "-n",
        f"energybus-{service.port}@localhost",
        "--erlang-cookie",
        cookie,
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise ServiceError(f"rabbitmqctl {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def rabbitmq_tenants(
    service: Service,
    tenants: Mapping[str, tuple[str, str]],
    permissions: Mapping[str, tuple[str, str, str]] | None = None,
) -> None:
    """Give each user of ``tenants`` (``user: (password, vhost)``) a vhost of its own, in
    one call (a definitions import): the way a platform such as Voke gives each
    organisation its own vhost and credentials. On it a user may do what its entry in
    ``permissions`` (``user: (configure, write, read)``, RabbitMQ's regular expressions
    over resource names) allows; every resource for a user without one."""
    permissions = permissions or {}
    unknown = set(permissions) - set(tenants)
    if unknown:
        raise ServiceError(f"permissions for users not among the tenants: {sorted(unknown)}")
    definitions = {
        "vhosts": [{"name": vhost} for _, vhost in tenants.values()],
        "users": [
            {"name": user, "password": password, "tags": ""}
            for user, (password, _) in tenants.items()
        ],
        "permissions": [],
    }
    for user, (_, vhost) in tenants.items():
        configure, write, read = permissions.get(user, (".*", ".*", ".*"))
        definitions["permissions"].append(
            {"user": user, "vhost": vhost, "configure": configure, "write": write, "read": read}
        )
    base = _data_dir(Path(service.run_dir), "rabbitmq", "rabbitmq")
    path = base / "tenants.json"
    # The definitions hold passwords: readable by the node's user only.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(definitions, out)
    _chown_for("rabbitmq", path)
    try:
        rabbitmqctl(service, "import_definitions", str(path))
    finally:
        path.unlink(missing_ok=True)


SERVICES: dict[str, Callable[..., tuple[subprocess.Popen[bytes], str]]] = {
    "mosquitto": _start_mosquitto,
    "postgres": _start_postgres,
    "rabbitmq": _start_rabbitmq,
    # Node.js and Node-RED from npm, for the benchmark beside Node-RED (tools/nodered.py).
    "nodered": functools.partial(nodered.start_nodered, error=ServiceError),
}
"""Each starter takes the run directory and port, and the keyword options of
:func:`start` its service has (``secure``; Mosquitto's ``acl``) only when they are set."""


def running(name: str, run_dir: Path = DEFAULT_RUN_DIR) -> Service | None:
    """The service recorded under ``run_dir`` if its process is still alive."""
    try:
        state = json.loads(_state_file(run_dir, name).read_text())
    except (OSError, ValueError):
        return None
    service = Service(**state)
    try:
        os.kill(service.pid, 0)
    except OSError:
        return None
    return service


def start(
    name: str,
    *,
    run_dir: Path = DEFAULT_RUN_DIR,
    port: int | None = None,
    secure: bool = False,
    acl: str | None = None,
) -> Service:
    """Start ``name`` (or return it if it already runs there) and record its PID.

    ``secure`` locks it down (TLS only, generated passwords: see the module's docstring);
    ``acl``, for Mosquitto only, is the text of an ACL file (Mosquitto's ``acl_file``
    format) for its clients, anonymous ones on a plain broker."""
    if name not in SERVICES:
        raise ServiceError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
    if secure and name not in SECURE:
        raise ServiceError(f"{name} has no secure mode; these do: {', '.join(SECURE)}")
    if acl is not None and name != "mosquitto":
        raise ServiceError(f"an ACL is Mosquitto's, not {name}'s")
    run_dir = run_dir.resolve()
    existing = running(name, run_dir)
    if existing is not None:
        if existing.secure != secure:
            mode = "secure" if existing.secure else "plain"
            raise ServiceError(f"{name}: a {mode} {name} already runs under {run_dir}")
        return existing
    chosen = port if port is not None else free_port()
    if not _port_is_free(chosen):
        # Waiting for the port would then find the other listener and report success.
        raise ServiceError(f"{name}: {HOST}:{chosen} is already in use by another process")
    options: dict[str, Any] = {}
    if secure:
        options["secure"] = True
    if acl is not None:
        options["acl"] = acl
    try:
        process, url = SERVICES[name](run_dir, chosen, **options)
    except ServiceError as exc:
        raise ServiceError(f"{name}: {exc}") from None
    service = Service(name, HOST, chosen, process.pid, str(run_dir), url, secure)
    service.state_file().write_text(json.dumps(_record(service)))
    return service


def stop(name: str, *, run_dir: Path = DEFAULT_RUN_DIR, timeout: float = 60) -> bool:
    """Stop the service recorded under ``run_dir`` cleanly; True if one was running.

    The service gets its clean stop signal (``STOP_SIGNALS``, else SIGTERM), so
    PostgreSQL disconnects its clients, checkpoints and needs no recovery at the next
    start. A service still running after ``timeout`` seconds is killed as by
    :func:`crash`, and ServiceError then says so: that was a crash, not a stop.
    """
    service = running(name, run_dir.resolve())
    if service is None:
        return False
    sig = STOP_SIGNALS.get(name, signal.SIGTERM)
    processes = _processes(service.pid)
    # The signal goes to the process group, which each service leads, with one
    # exception: as root the head of the group is ``runuser``, which answers SIGTERM by
    # sending its child SIGTERM and, two seconds later, SIGKILL. The server alone gets
    # the signal then, and ``runuser`` exits with it.
    for pid in _group(service.pid):
        if pid != service.pid or not _is_runuser(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    if not _wait_gone(service.pid, processes, timeout):
        _kill(service, processes)
        raise ServiceError(
            f"{name}: still running {timeout:.0f}s after {sig.name}, so it was killed with"
            " SIGKILL: a crash, not a clean stop"
        )
    _forget(service)
    return True


def crash(name: str, *, run_dir: Path = DEFAULT_RUN_DIR) -> bool:
    """Kill the service recorded under ``run_dir`` abruptly; True if one was running.

    For tests of faults: SIGKILL to each of its processes at once, as a power cut or
    the OOM killer would, then reap them. PostgreSQL recovers from its WAL at the next
    start ("database system was not properly shut down").
    """
    service = running(name, run_dir.resolve())
    if service is None:
        return False
    _kill(service)
    return True


def _kill(service: Service, known: Mapping[int, str] | None = None) -> None:
    processes = _processes(service.pid, known)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.pid, signal.SIGKILL)
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not _wait_gone(service.pid, processes, 5.0):
        raise ServiceError(f"{service.name}: process {service.pid} survived SIGKILL")
    _forget(service)


def _forget(service: Service) -> None:
    service.state_file().unlink(missing_ok=True)
    if service.name == "rabbitmq":
        _stop_idle_epmd()


def _process_table() -> dict[int, tuple[int, int, str]]:
    """Every process, as ``pid: (parent, process group, start time)``, from /proc."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = entry.joinpath("stat").read_text()
                # After the command name, which is in parentheses and may hold either.
                fields = stat[stat.rindex(")") + 2 :].split()
                table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[19])
    return table


def _processes(leader: int, known: Mapping[int, str] | None = None) -> dict[int, str]:
    """The live processes of the service whose group ``leader`` heads, as ``pid: start
    time``: the group, those of ``known`` still running (same PID, same start time), and
    every descendant of these. Descendants count because PostgreSQL's postmaster puts
    each of its children in a session of its own, outside the group. A zombie counts
    until it is reaped: PostgreSQL's lock file check takes a zombie postmaster for a
    running one."""
    table = _process_table()
    known = known or {}
    found = [
        pid
        for pid, (_, pgid, started) in table.items()
        if pgid == leader or known.get(pid) == started
    ]
    children: dict[int, list[int]] = {}
    for pid, (parent, *_) in table.items():
        children.setdefault(parent, []).append(pid)
    seen = set(found)
    while found:
        for child in children.get(found.pop(), []):
            if child not in seen:
                seen.add(child)
                found.append(child)
    return {pid: table[pid][2] for pid in seen}


def _group(leader: int) -> list[int]:
    return [pid for pid, (_, pgid, _) in _process_table().items() if pgid == leader]


def _is_runuser(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "runuser"
    except OSError:
        return False


def _wait_gone(leader: int, processes: Mapping[int, str], timeout: float) -> bool:
    """Wait until the service's processes are gone (see :func:`_processes`), reaping
    ``leader`` if it is our child. The whole group and tree matter: as root the recorded
    process is ``runuser``, and the server under it may still be shutting down (and
    holding its lock file) after ``runuser`` has exited; PostgreSQL's backends, outside
    the group, hold its shared memory until they exit."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(leader, os.WNOHANG)
        if not _processes(leader, processes):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _stop_idle_epmd() -> None:
    """RabbitMQ starts Erlang's port mapper as a daemon; stop it once no node uses it."""
    epmd = shutil.which("epmd") or next(iter(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")), None)
    if epmd is None:
        return
    env = {**os.environ, "ERL_EPMD_ADDRESS": HOST}
    names = subprocess.run([str(epmd), "-names"], capture_output=True, text=True, env=env)
    if names.returncode == 0 and "name " not in names.stdout:
        subprocess.run([str(epmd), "-kill"], capture_output=True, env=env, check=False)


@contextlib.contextmanager
def started(
    name: str,
    *,
    run_dir: Path,
    port: int | None = None,
    secure: bool = False,
    acl: str | None = None,
) -> Iterator[Service]:
    """Run ``name`` for the duration of a ``with`` block (options as :func:`start`)."""
    service = start(name, run_dir=run_dir, port=port, secure=secure, acl=acl)
    try:
        yield service
    finally:
        stop(name, run_dir=run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "crash", "status"])
    parser.add_argument("names", nargs="*", default=[], help=f"any of {', '.join(SERVICES)}")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument(
        "--default-ports",
        action="store_true",
        help=f"use the fixed demo ports {DEFAULT_PORTS} instead of free ones",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="up: TLS only and generated passwords (in <run-dir>/<name>/credentials.json)",
    )
    # Intermixed: "up --secure mosquitto" as well as "up mosquitto --secure".
    args = parser.parse_intermixed_args(argv)
    names = args.names or list(SECURE if args.secure else SERVICES)
    try:
        for name in names:
            if args.action == "up":
                port = DEFAULT_PORTS[name] if args.default_ports else None
                service = start(name, run_dir=args.run_dir, port=port, secure=args.secure)
                print(json.dumps(_record(service)))
            elif args.action == "down":
                print(f"{name}: {'stopped' if stop(name, run_dir=args.run_dir) else 'not running'}")
            elif args.action == "crash":
                killed = crash(name, run_dir=args.run_dir)
                print(f"{name}: {'killed with SIGKILL' if killed else 'not running'}")
            else:
                found = running(name, args.run_dir.resolve())
                print(json.dumps(_record(found)) if found else f"{name}: not running")
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
