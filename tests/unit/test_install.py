"""providers/install.py on a folder tree, with systemd stood in for by a double that runs
what the unit points at: after a restart, the running version is the hash of the files behind
<install dir>/current as it reads them itself (not through install's helpers)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from providers import install, ownership, runtime
from providers.ownership import AgentError
from tests import hostile

PROVIDERS = Path(runtime.__file__).parent


def sources(comment: str = "") -> dict[str, bytes]:
    """The shipped director sources; `comment` makes another version of them."""
    files = {name: (PROVIDERS / name).read_bytes() for name in runtime.SOURCE_FILES}
    files["runtime.py"] += comment.encode()
    return files


def hash_of(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in runtime.SOURCE_FILES:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class Systemd(install.Director):
    def __init__(self, root: Path, booted: bool = True, fail_restart_of: str | None = None):
        self.install_dir = str(root / "usr/local/lib/ipvs-ingress")
        self.unit_path = str(root / "etc/systemd/system/ipvs-ingress.service")
        self.keepalived_unit_path = str(root / "etc/systemd/system/ipvs-ingress-keepalived.service")
        self.command_path = str(root / "usr/local/sbin/ipvs-ingress")
        self.systemd_run = str(root / "run/systemd/system")
        if booted:
            os.makedirs(self.systemd_run)
        self.fail_restart_of = fail_restart_of
        self.calls: list[tuple] = []
        self.running: str | None = None
        self.loaded_unit: str | None = None

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        self.calls.append(args)
        if args[0] == "is-active":
            return subprocess.CompletedProcess(args, 0, "active\n" if self.running else "inactive\n", "")  # fmt: skip
        if args[0] == "daemon-reload":
            self.loaded_unit = Path(self.unit_path).read_text()
        if args[0] == "restart":
            assert self.loaded_unit == Path(self.unit_path).read_text(), (
                "unit changed, not reloaded"
            )
            version = hash_of(Path(self.install_dir) / "current" / "providers")
            if version == self.fail_restart_of:
                self.running = None
                return subprocess.CompletedProcess(args, 1, "", "Job failed. See journalctl.\n")
            self.running = version
        return subprocess.CompletedProcess(args, 0, "", "")

    def running_version(self, wait: float = 0.0) -> str | None:
        return self.running


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "RUN_DIR", str(tmp_path / "run/ipvs-ingress"))


def verbs(d: Systemd) -> list[str]:
    return [c[0] for c in d.calls]


def test_a_fresh_install_writes_the_version_switches_and_starts_it(tmp_path):
    d = Systemd(tmp_path)
    result = install.install(sources(), d)
    version = hash_of(PROVIDERS)
    assert result == {"installed": version, "restarted": True, "previous": None}
    assert d.running == version
    current = Path(d.install_dir) / "current"
    assert os.readlink(current) == f"versions/{version}"
    assert Path(d.unit_path).read_text() == runtime.unit_text(str(current), d.python)
    assert verbs(d) == ["daemon-reload", "enable", "is-active", "restart"]
    command = Path(d.command_path)
    assert command.stat().st_mode & 0o777 == 0o755
    assert command.read_text().splitlines()[-1] == (
        f'cd / && PYTHONPATH={current} exec {d.python} -m providers.runtime "$@"'
    )


def test_the_same_version_again_changes_nothing_and_restarts_nothing(tmp_path):
    d = Systemd(tmp_path)
    install.install(sources(), d)
    d.calls.clear()
    unit_before = os.stat(d.unit_path).st_mtime_ns
    assert install.install(sources(), d)["restarted"] is False
    assert verbs(d) == ["enable"] and os.stat(d.unit_path).st_mtime_ns == unit_before


def test_an_upgrade_keeps_the_previous_version_and_prunes_older_ones(tmp_path):
    d = Systemd(tmp_path)
    versions = []
    for comment in ("", "# two\n", "# three\n"):
        install.install(sources(comment), d)
        versions.append(d.running)
    assert len(set(versions)) == 3
    kept = sorted(os.listdir(Path(d.install_dir) / "versions"))
    assert kept == sorted(versions[1:])
    assert verbs(d).count("daemon-reload") == 1  # the unit is the same for every version
    assert install.install(sources("# two\n"), d)["previous"] == versions[2]


def test_a_runtime_that_does_not_come_up_is_rolled_back_with_one_line(tmp_path):
    d = Systemd(tmp_path)
    install.install(sources(), d)
    old = d.running
    new_files = sources("# broken\n")
    d.fail_restart_of = broken = _version(new_files)
    with pytest.raises(AgentError) as err:
        install.install(new_files, d)
    assert err.value.code == "runtime-failed"
    assert str(err.value) == (
        f"the runtime {broken} did not come up (Job failed. See journalctl.); version "
        f"{old} was put back: see journalctl -u ipvs-ingress.service on the director"
    )
    assert d.running == old
    assert os.readlink(Path(d.install_dir) / "current") == f"versions/{old}"


def _version(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in runtime.SOURCE_FILES:
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    return digest.hexdigest()[:16]


def test_without_systemd_nothing_is_written(tmp_path):
    d = Systemd(tmp_path, booted=False)
    with pytest.raises(AgentError) as err:
        install.install(sources(), d)
    assert err.value.code == "no-systemd"
    assert str(err.value).startswith("the director runs no systemd (PID 1 is ")
    assert not Path(d.install_dir).exists() and not Path(d.unit_path).exists() and d.calls == []


class Killed(BaseException):
    """A kill -9 at one step: nothing after it runs, no handler sees it."""


def test_a_kill_at_any_step_converges_on_the_next_run(tmp_path, monkeypatch):
    """Each file-system and systemctl step in turn is the last one to happen; then a plain
    second run must leave the new version running, and the old one until then."""
    steps = ("_write", "os.rename", "os.replace", "os.symlink", "systemctl")
    k, points = 0, 0
    while True:
        root = tmp_path / f"k{k}"
        d = Systemd(root)
        install.install(sources(), d)
        old = d.running
        count = [0]

        def tick(real, count=count, k=k):
            def step(*args, **kwargs):
                count[0] += 1
                if count[0] > k:
                    raise Killed()
                return real(*args, **kwargs)

            return step

        with monkeypatch.context() as m:
            m.setattr(install, "_write", tick(install._write))
            m.setattr(install.os, "rename", tick(os.rename))
            m.setattr(install.os, "replace", tick(os.replace))
            m.setattr(install.os, "symlink", tick(os.symlink))
            m.setattr(d, "systemctl", tick(d.systemctl))
            try:
                install.install(sources("# new\n"), d)
                finished = True
            except Killed:
                finished = False
        if finished:
            break
        assert d.running in (old, _version(sources("# new\n")))  # never nothing
        # `current` always names a whole version: the old one or the new one, never a part.
        assert hash_of(Path(d.install_dir) / "current" / "providers") in (
            old,
            _version(sources("# new\n")),
        )
        install.install(sources("# new\n"), d)
        assert d.running == _version(sources("# new\n")), f"kill after step {k}"
        assert Path(d.unit_path).read_text() == runtime.unit_text(
            str(Path(d.install_dir) / "current"), d.python
        )
        k += 1
        points += 1
    assert points >= 8, steps  # every write of the version, the switch, the unit, systemctl
    hostile.record(crash_points=points)


def test_the_operators_command_runs_the_installed_runtime_cli(tmp_path):
    d = Systemd(tmp_path)
    install.install(sources("# installed\n"), d)
    done = subprocess.run([d.command_path, "version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == _version(sources("# installed\n")) != hash_of(PROVIDERS)


class Restarting(Systemd):
    """The runtime is coming back (a kill, another provider's upgrade): not listening yet."""

    def running_version(self, wait: float = 0.0) -> str | None:
        return self.running if wait > 0 else None

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        if args[0] == "is-active":
            self.calls.append(args)
            return subprocess.CompletedProcess(args, 0, "activating\n", "")
        return super().systemctl(*args)


def test_a_runtime_coming_back_is_waited_for_not_restarted(tmp_path):
    d = Restarting(tmp_path)
    d.running = _version(sources())  # what systemd is starting: this very version
    result = install.install(sources(), d)
    assert result["restarted"] is False and "restart" not in verbs(d)


def test_what_it_writes_is_root_writable_only_whatever_the_umask(tmp_path):
    d = Systemd(tmp_path)
    os.makedirs(d.install_dir, mode=0o777)
    os.chmod(d.install_dir, 0o777)  # left by an earlier session with umask 0
    old = os.umask(0)
    try:
        install.install(sources(), d)
    finally:
        os.umask(old)
    root = Path(d.install_dir)
    version_dir = root / "versions" / d.running
    for folder in (root, root / "versions", version_dir, version_dir / "providers"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
    for file in (*(version_dir / "providers").iterdir(), Path(d.unit_path)):
        assert file.stat().st_mode & 0o777 == 0o644, file
    assert Path(d.command_path).stat().st_mode & 0o777 == 0o755


def test_an_unexpected_failure_is_one_line_on_the_protocol(monkeypatch):
    import io
    import json

    def full_disk(sources, director):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(install, "install", full_disk)
    out = io.StringIO()
    assert install.main([("providers", "")], out=out, director_factory=lambda: None) == 1
    assert json.loads(out.getvalue()) == {
        "ready": False,
        "code": "install-failed",
        "error": "installing the runtime failed (OSError: [Errno 28] No space left on device)",
    }


def test_a_stop_waits_longer_than_a_request_may_drain():
    from providers import api

    unit = runtime.unit_text("/x")
    stop = int(next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec=")).split("=")[1])  # fmt: skip
    assert stop > api.DRAIN_SECONDS + 10
