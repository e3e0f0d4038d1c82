"""Installs or upgrades the runtime on the director, for the provider.

Runs on the director (stdlib; pyroute2 is only checked), started by the provider as one
`python3 -c` with the sources on stdin, and only when the runtime is missing or answers with
another version. Every step can be killed and the next run converges from there:
- the sources go to <install dir>/versions/<version>/providers/ (a temporary folder renamed
  into place, so a version folder is whole or absent),
- <install dir>/current is swapped to it with one rename (atomic),
- the unit is written the same way (and keepalived's, ipvs-ingress-keepalived.service, which only
  the runtime starts), then `systemctl daemon-reload` if either changed, and the
  operators' command /usr/local/sbin/ipvs-ingress (`ipvs-ingress status`),
- `systemctl enable` and `systemctl restart`, unless the runtime already answers with this
  version. The unit is Type=notify, so the restart returns once the new runtime finished its
  first pass. The old runtime leaves the table and VIPs as they are when it stops and the new
  one finds them equal to the record: an upgrade changes no kernel object, so it drops no packet,
- a new runtime that does not come up is rolled back to the previous version, so the director
  is never left without a runtime by an upgrade,
- two versions are kept (the current one and the one before), older ones are removed.
state.json (the desired state) and runtime.json (the operator's settings) are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from providers import agent, api, ownership, runtime, vrrp
from providers.ownership import AgentError

UNIT_PATH = f"/etc/systemd/system/{runtime.UNIT_NAME}"
COMMAND_PATH = "/usr/local/sbin/ipvs-ingress"  # `ipvs-ingress status` for operators
SYSTEMD_RUN = "/run/systemd/system"  # sd_booted(3): present only when systemd is PID 1
KEEP_VERSIONS = 2
ANSWER_SECONDS = 30.0


def module_file(name: str) -> str:
    """ "providers.model" -> "model.py", "providers" -> "__init__.py"."""
    return "__init__.py" if name == "providers" else name.split(".", 1)[1] + ".py"


class Director:
    """The director's side effects, in one place so that tests can stand in for them."""

    install_dir = runtime.INSTALL_DIR
    unit_path = UNIT_PATH
    # keepalived under the project's own unit, started by the runtime (providers/vrrp.py)
    keepalived_unit_path = vrrp.UNIT_PATH
    command_path = COMMAND_PATH
    systemd_run = SYSTEMD_RUN
    python = sys.executable or "/usr/bin/python3"  # the one that passed the pyroute2 check

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["systemctl", *args], capture_output=True, text=True, timeout=300, check=False
        )

    def running_version(self, wait: float = 0.0) -> str | None:
        """The version the listening runtime greets with; None if none answers."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with socket.create_connection((api.HOST, api.PORT), timeout=5) as conn:
                    greeting = json.loads(conn.makefile("r").readline() or "{}")
                return greeting.get("version") if greeting.get("ready") else None
            except (OSError, ValueError):
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.2)

    def pid1(self) -> str:
        try:
            with open("/proc/1/comm") as f:
                return f.read().strip()
        except OSError:
            return "unknown"


def install(sources: dict[str, bytes], d: Director | None = None) -> dict:
    """Make the runtime of `sources` (file name -> bytes) the one that runs; idempotent."""
    d = d or Director()
    if not os.path.isdir(d.systemd_run):
        raise AgentError(
            "no-systemd",
            f"the director runs no systemd (PID 1 is {d.pid1()}): the runtime is a systemd service",  # fmt: skip
        )
    agent._load_pyroute2()  # a missing or old pyroute2 is named now, not by a failing unit
    os.umask(0o022)  # root runs this code later: whatever the session's umask, others only read
    version = runtime.version_of(sources)
    with ownership.director_lock(os.path.join(ownership.RUN_DIR, "install.lock"), wait=300):
        previous = _current(d)
        _write_version(d, version, sources)
        _switch(d, version)
        _write_command(d)
        unit_changed = _write_unit(d)
        # Written (not enabled, not started): the runtime starts it when a VRRP service exists.
        unit_changed = _replace(d.keepalived_unit_path, vrrp.unit_text().encode(), 0o644) or unit_changed  # fmt: skip
        if unit_changed:
            _check(d, "daemon-reload")
        _check(d, "enable", "--quiet", runtime.UNIT_NAME)
        was = d.running_version()
        if was is None and d.systemctl("is-active", runtime.UNIT_NAME).stdout.strip() in ("active", "activating", "reloading"):  # fmt: skip
            # Restarting (a kill, another provider's upgrade): wait for it, do not restart it.
            was = d.running_version(wait=ANSWER_SECONDS)
        if was == version:
            return {"installed": version, "restarted": False, "previous": was}
        restarted = d.systemctl("restart", runtime.UNIT_NAME)
        now = d.running_version(wait=ANSWER_SECONDS) if restarted.returncode == 0 else None
        if now != version:
            _roll_back(d, previous, version)
            detail = (restarted.stderr or restarted.stdout or "").strip().splitlines()
            why = detail[-1][:120] if detail else f"it answers with version {now}"
            raise AgentError(
                "runtime-failed",
                f"the runtime {version} did not come up ({why}); version {previous or 'none'} was put back: see journalctl -u {runtime.UNIT_NAME} on the director",  # fmt: skip
            )
        _prune(d, version, previous)
        return {"installed": version, "restarted": True, "previous": was}


def _versions(d: Director) -> str:
    return os.path.join(d.install_dir, "versions")


def _current(d: Director) -> str | None:
    try:
        return os.path.basename(os.readlink(os.path.join(d.install_dir, "current")))
    except OSError:
        return None


def _write_version(d: Director, version: str, sources: dict[str, bytes]) -> None:
    for folder in (d.install_dir, _versions(d)):
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o755)  # made by someone else's umask before: root runs code from it
    target = os.path.join(_versions(d), version)
    if os.path.isdir(target) and runtime.source_version(os.path.join(target, "providers")) == version:  # fmt: skip
        return
    tmp = os.path.join(_versions(d), f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "providers"), mode=0o755)
    for name, data in sources.items():
        _write(os.path.join(tmp, "providers", name), data, 0o644)
    shutil.rmtree(target, ignore_errors=True)  # a folder that does not hash right: replaced
    os.rename(tmp, target)
    _fsync_dir(_versions(d))


def _switch(d: Director, version: str) -> None:
    link = os.path.join(d.install_dir, "current")
    if _current(d) == version:
        return
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(os.path.join("versions", version), tmp)
    os.replace(tmp, link)
    _fsync_dir(d.install_dir)


def _write_unit(d: Director) -> bool:
    text = runtime.unit_text(os.path.join(d.install_dir, "current"), d.python)
    return _replace(d.unit_path, text.encode(), 0o644)


def _replace(path: str, text: bytes, mode: int) -> bool:
    """Write `path` atomically (a whole old or a whole new file), only if it differs."""
    try:
        with open(path, "rb") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    _write(tmp, text, mode)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))
    return True


def command_text(install_dir: str, python: str) -> str:
    """The operators' command: the runtime's CLI (status, version, unit) on the current code."""
    current = os.path.join(install_dir, "current")
    # From /: `python3 -m` puts the working directory first on sys.path.
    return (
        "#!/bin/sh\n"
        "# ipvs-ingress: written by the provider's installer\n"
        f'cd / && PYTHONPATH={current} exec {python} -m providers.runtime "$@"\n'
    )


def _write_command(d: Director) -> None:
    _replace(d.command_path, command_text(d.install_dir, d.python).encode(), 0o755)


def _roll_back(d: Director, previous: str | None, version: str) -> None:
    if previous and previous != version and os.path.isdir(os.path.join(_versions(d), previous)):
        _switch(d, previous)
        d.systemctl("restart", runtime.UNIT_NAME)


def _prune(d: Director, version: str, previous: str | None) -> None:
    keep = {version, previous}
    for name in os.listdir(_versions(d)):
        if name not in keep:
            shutil.rmtree(os.path.join(_versions(d), name), ignore_errors=True)


def _check(d: Director, *args: str) -> None:
    done = d.systemctl(*args)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip().splitlines()
        raise AgentError(
            "systemctl",
            f"systemctl {' '.join(args)} failed ({detail[-1][:120] if detail else done.returncode}): check systemd on the director",  # fmt: skip
        )


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(modules: list, out=None, director_factory: Callable[[], Director] = Director) -> int:
    """The provider's entry point: `modules` are the (module name, source) pairs it shipped."""
    sources = {module_file(name): text.encode() for name, text in modules}
    try:
        with agent._heartbeats(None, out):  # a restart waits for the new runtime's first pass
            result = install(sources, director_factory())
    except AgentError as err:
        agent._emit({"ready": False, "code": err.code, "error": str(err)}, out)
        return 1
    except Exception as err:  # a full disk, a read-only /usr, systemctl hanging: one line
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        agent._emit({"ready": False, "code": "install-failed", "error": f"installing the runtime failed ({reason})"}, out)  # fmt: skip
        return 1
    agent._emit({"ready": True, **result}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.stdin.readline())))
