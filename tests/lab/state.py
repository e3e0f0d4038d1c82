"""What a lab run owns, on disk, so any process can tear it down by PID and by name.

Each run has ``<cache>/runs/<id>/state.json``, written *before* a namespace or process is
created, so a run that dies at any point leaves a record a later run can clean. A process is
identified by PID plus its start time (a recycled PID is never killed). A run is stale when
its owner is gone: the test process for a session lab, qemu for a lab started by
``python -m tests.lab up``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

NETNS_DIR = Path("/run/netns")


def start_time(pid: int) -> int | None:
    """Kernel start time of a live (non-zombie) process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass
class Proc:
    pid: int
    start: int
    what: str

    @classmethod
    def of(cls, pid: int, what: str) -> Proc:
        started = start_time(pid)
        if started is None:
            raise RuntimeError(f"{what} (pid {pid}) exited right after it started")
        return cls(pid, started, what)

    def alive(self) -> bool:
        return start_time(self.pid) == self.start


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it


def kill(proc: Proc, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not proc.alive():
            break
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap(proc.pid)
            if not proc.alive():
                break
            time.sleep(0.05)
    reap(proc.pid)
    if proc.alive():
        raise RuntimeError(f"could not kill {proc.what} (pid {proc.pid})")


def namespace_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def delete_namespace(name: str) -> None:
    if not namespace_exists(name):
        return
    # Anything still running inside a namespace this lab created is this lab's own.
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in pids.stdout.split():
        started = start_time(int(pid))
        if started is not None:
            kill(Proc(int(pid), started, f"process in {name}"))
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
    if namespace_exists(name):
        raise RuntimeError(f"could not delete namespace {name}")


@dataclass
class RunState:
    id: str
    dir: str
    owner: Proc
    persistent: bool = False
    namespaces: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # how to reach the lab, for `status`

    @property
    def path(self) -> Path:
        return Path(self.dir) / "state.json"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.rename(self.path)

    @classmethod
    def load(cls, path: Path) -> RunState:
        raw = json.loads(path.read_text())
        raw["owner"] = Proc(**raw["owner"])
        raw["procs"] = [Proc(**p) for p in raw["procs"]]
        return cls(**raw)

    def add_proc(self, pid: int, what: str) -> Proc:
        proc = Proc.of(pid, what)
        self.procs.append(proc)
        self.save()
        return proc


def teardown(state: RunState) -> None:
    """Kill the run's processes (newest first), delete its namespaces, forget the run."""
    errors = []
    for proc in reversed(state.procs):
        try:
            kill(proc)
        except RuntimeError as exc:
            errors.append(str(exc))
    for ns in state.namespaces:
        try:
            delete_namespace(ns)
        except RuntimeError as exc:
            errors.append(str(exc))
    if errors:
        raise RuntimeError("lab teardown incomplete: " + "; ".join(errors))
    shutil.rmtree(state.dir, ignore_errors=True)


def runs(cache: Path) -> list[RunState]:
    found = []
    for path in sorted((cache / "runs").glob("*/state.json")):
        try:
            found.append(RunState.load(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written by a run that died; its namespaces are not recorded yet
    return found


def cleanup_stale(cache: Path) -> list[str]:
    """Tear down every run whose owner is gone; returns their ids."""
    cleaned = []
    for run in runs(cache):
        if not run.owner.alive():
            teardown(run)
            cleaned.append(run.id)
    return cleaned
