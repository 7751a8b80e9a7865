"""Start and stop the real services energybus talks to, for tests and the local demo.

Mosquitto, PostgreSQL and RabbitMQ come from Debian's packages (installed with apt-get
when missing), run as plain child processes on loopback ports, keep their data under a
project-local run directory, and are stopped by the PID this module recorded: cleanly
(PostgreSQL with its fast shutdown), or on purpose abruptly with ``crash`` for tests of
faults. Nothing touches the system's own service instances or their configuration.
Node-RED, for the benchmark beside it, comes with its own Node.js from the npm registry
(tools/nodered.py).

Standard library only, so it runs before the project's virtualenv exists::

    python3 tools/services.py up mosquitto postgres --run-dir .run
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

try:
    from tools import nodered
except ImportError:  # python3 tools/services.py: tools/ itself is sys.path[0]
    import nodered  # type: ignore[no-redef, import-not-found]

__all__ = [
    "SERVICES",
    "Service",
    "ServiceError",
    "apt_install",
    "crash",
    "free_port",
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

    def state_file(self) -> Path:
        return _state_file(Path(self.run_dir), self.name)


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


def _start_mosquitto(run_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
    binary = _require("mosquitto", "mosquitto", "mosquitto-clients")
    data = _data_dir(run_dir, "mosquitto", "mosquitto")
    log = data / "mosquitto.log"
    conf = data / "mosquitto.conf"
    # As a production broker would run (docs/worker.md, "Broker settings"). Persistence,
    # saved every 5 minutes and at a clean stop (SIGTERM): each save rewrites the whole
    # file, so saving every second rewrites everything queued every second. Queues
    # bounded per client, whichever bound comes first: 256 MiB is ~40 s of a worker's
    # source session at 2,000 VEN messages/s of 3 KB (its own canonical output is never
    # queued for it: No Local); 200,000 canonical values (~30 MB) are 2 s of the whole
    # bus at that rate for another subscriber. Sessions that ask never to expire go after
    # 14 days, longer than any session the worker asks for.
    conf.write_text(
        f"listener {port} {HOST}\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {data}/\n"
        "autosave_interval 300\n"
        f"log_dest file {log}\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
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
    return process, f"mqtt://{HOST}:{port}"


def _postgres_bin() -> Path:
    roots = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not roots:
        apt_install("postgresql")
        roots = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not roots:
        raise ServiceError("PostgreSQL binaries not found under /usr/lib/postgresql")
    return roots[0].parent


def _start_postgres(run_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
    bindir = _postgres_bin()
    base = _data_dir(run_dir, "postgres", "postgres")
    data = base / "data"
    as_pg = _as_service_user("postgres")
    log = base / "postgres.log"
    if not (data / "PG_VERSION").exists():
        # Trust on loopback only: a throwaway cluster for tests and the demo.
        result = subprocess.run(
            [
                *as_pg,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "energybus",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stderr}")
    server = [str(bindir / "postgres"), "-D", str(data), "-p", str(port)]
    settings = {"listen_addresses": HOST, "unix_socket_directories": str(base)}
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
        )
        if result.returncode == 0:
            break
        time.sleep(0.1)
    if result.stdout.strip() != "1":
        subprocess.run(
            [str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", "energybus", "energybus"],
            check=True,
            capture_output=True,
        )
    return process, f"postgresql://energybus@{HOST}:{port}/energybus"


def _start_rabbitmq(run_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
    binary = _require("rabbitmq-server", "rabbitmq-server")
    base = _data_dir(run_dir, "rabbitmq", "rabbitmq")
    log = base / "rabbitmq.log"
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
    (base / "rabbitmq.conf").write_text("loopback_users = none\n")
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
    return process, f"amqp://guest:guest@{HOST}:{port}/"


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


def rabbitmq_tenants(service: Service, tenants: Mapping[str, tuple[str, str]]) -> None:
    """Give each user of ``tenants`` (``user: (password, vhost)``) a vhost of its own with
    every permission on it, in one call (a definitions import): the way a platform such
    as Voke gives each organisation its own vhost and credentials."""
    definitions = {
        "vhosts": [{"name": vhost} for _, vhost in tenants.values()],
        "users": [
            {"name": user, "password": password, "tags": ""}
            for user, (password, _) in tenants.items()
        ],
        "permissions": [
            {"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
            for user, (_, vhost) in tenants.items()
        ],
    }
    base = _data_dir(Path(service.run_dir), "rabbitmq", "rabbitmq")
    path = base / "tenants.json"
    path.write_text(json.dumps(definitions))
    _chown_for("rabbitmq", path)
    try:
        rabbitmqctl(service, "import_definitions", str(path))
    finally:
        path.unlink(missing_ok=True)


SERVICES: dict[str, Callable[[Path, int], tuple[subprocess.Popen[bytes], str]]] = {
    "mosquitto": _start_mosquitto,
    "postgres": _start_postgres,
    "rabbitmq": _start_rabbitmq,
    # Node.js and Node-RED from npm, for the benchmark beside Node-RED (tools/nodered.py).
    "nodered": functools.partial(nodered.start_nodered, error=ServiceError),
}


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


def start(name: str, *, run_dir: Path = DEFAULT_RUN_DIR, port: int | None = None) -> Service:
    """Start ``name`` (or return it if it already runs there) and record its PID."""
    if name not in SERVICES:
        raise ServiceError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
    run_dir = run_dir.resolve()
    existing = running(name, run_dir)
    if existing is not None:
        return existing
    chosen = port if port is not None else free_port()
    if not _port_is_free(chosen):
        # Waiting for the port would then find the other listener and report success.
        raise ServiceError(f"{name}: {HOST}:{chosen} is already in use by another process")
    try:
        process, url = SERVICES[name](run_dir, chosen)
    except ServiceError as exc:
        raise ServiceError(f"{name}: {exc}") from None
    service = Service(name, HOST, chosen, process.pid, str(run_dir), url)
    service.state_file().write_text(json.dumps(asdict(service)))
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
def started(name: str, *, run_dir: Path, port: int | None = None) -> Iterator[Service]:
    """Run ``name`` for the duration of a ``with`` block."""
    service = start(name, run_dir=run_dir, port=port)
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
    args = parser.parse_args(argv)
    names = args.names or list(SERVICES)
    try:
        for name in names:
            if args.action == "up":
                port = DEFAULT_PORTS[name] if args.default_ports else None
                service = start(name, run_dir=args.run_dir, port=port)
                print(json.dumps(asdict(service)))
            elif args.action == "down":
                print(f"{name}: {'stopped' if stop(name, run_dir=args.run_dir) else 'not running'}")
            elif args.action == "crash":
                killed = crash(name, run_dir=args.run_dir)
                print(f"{name}: {'killed with SIGKILL' if killed else 'not running'}")
            else:
                found = running(name, args.run_dir.resolve())
                print(json.dumps(asdict(found)) if found else f"{name}: not running")
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
