"""What the lab tests do to and read from ipvs-ingress on a lab director: its record, its
runtime's settings, unit and status, the README's uninstall. The director's own tools (cat,
flock, systemctl, readlink) are the oracle; nothing here uses the provider.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from contextlib import contextmanager
from pathlib import Path

from providers import install, ownership, runtime

STATE = ownership.STATE_PATH
LOCK = "/run/ipvs-ingress/lock"  # ownership.LOCK_PATH on the director (the host may lack /run)
UNIT = runtime.UNIT_NAME
UNIT_PATH = install.UNIT_PATH
CONFIG = runtime.CONFIG_PATH
COMMAND = install.COMMAND_PATH
INSTALL_DIR = runtime.INSTALL_DIR
STATUS_JSON = "/run/ipvs-ingress/status.json"
README = Path(__file__).resolve().parents[2] / "README.md"


def clear(lab, vips=()) -> None:
    """No record, no IPVS service, none of `vips` bound. Under the director lock and the record
    first, so a resident runtime neither restores what goes nor interleaves with it."""
    unbind = "".join(f"; ip addr del {v}/32 dev {lab.interface} 2>/dev/null" for v in vips)
    steps = f"rm -f {STATE}; ipvsadm -C{unbind}; true"
    lab.director(f"mkdir -p {Path(LOCK).parent} && flock {LOCK} sh -c {shlex.quote(steps)}")


def wait_for_pass(lab, timeout: float = 15) -> None:
    """Until the runtime (if it runs) started a reconcile pass after this call: one that read the
    settings and record as they are now."""
    wait = f"""
import json, os, sys, time
start, deadline = time.time(), time.time() + {timeout}
while time.time() < deadline:
    try:
        with open({STATUS_JSON!r}) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if saved is None or not os.path.exists("/proc/%d" % saved.get("pid", 0)):
        sys.exit(0)  # no runtime: the next one to start reads everything afresh
    if saved.get("lastReconcile", 0) - saved.get("lastPassSeconds", 0) > start:
        sys.exit(0)
    time.sleep(0.1)
sys.exit("no reconcile pass of the runtime within {timeout} s")
"""
    lab.director(f"python3 -c {shlex.quote(wait)}", timeout=timeout + 30)


@contextmanager
def repair_off(lab, *owners: str):
    """The operator's runtime.json turns the runtime's repair off for `owners` (their drift is
    then kept for refresh to show and `up` to repair); the file as it was afterwards."""
    before = lab.director(f"cat {CONFIG}", check=False)
    settings = json.loads(before.stdout) if before.returncode == 0 else {}
    settings.setdefault("repair", {}).update({o: False for o in owners})
    _write(lab, CONFIG, json.dumps(settings))
    wait_for_pass(lab)
    try:
        yield
    finally:
        if before.returncode == 0:
            _write(lab, CONFIG, before.stdout)
        else:
            lab.director(f"rm -f {CONFIG}")
        wait_for_pass(lab)


def _write(lab, path: str, text: str) -> None:
    tmp = f"{path}.lab-tmp"
    lab.director(
        f"mkdir -p {Path(path).parent} && printf %s {shlex.quote(text)} > {tmp} && mv {tmp} {path}"
    )


def unit(lab) -> dict[str, str]:
    """systemd's MainPID, ActiveState and NRestarts of the runtime's unit."""
    out = lab.director(
        f"systemctl show -p MainPID -p ActiveState -p NRestarts {UNIT}", check=False
    ).stdout
    return dict(line.split("=", 1) for line in out.split())


def wait_active(lab, timeout: float = 60) -> dict[str, str]:
    """The unit once it is active with a main process (e.g. after systemd restarted it)."""
    deadline = time.monotonic() + timeout
    while True:
        now = unit(lab)
        if now.get("ActiveState") == "active" and now.get("MainPID", "0") != "0":
            return now
        assert time.monotonic() < deadline, f"{UNIT} not active after {timeout:.0f} s: {now}"
        time.sleep(0.3)


def installed_version(lab) -> str | None:
    """The version `current` points at (None: no runtime installed)."""
    out = lab.director(f"readlink {INSTALL_DIR}/current", check=False)
    return Path(out.stdout.strip()).name if out.returncode == 0 else None


def status(lab) -> tuple[int, list[str]]:
    """`ipvs-ingress status` on the director: exit code and lines."""
    out = lab.director(f"{COMMAND} status", check=False)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stdout.splitlines()


def interpreters(lab) -> list[str]:
    """pids of interpreters the provider started on the director (`python3 -u -c <boot>`: only
    the installer runs so)."""
    return lab.director("pgrep -f '^python3 -u -c' || true").stdout.split()


def documented_uninstall() -> str:
    """The README's uninstall commands, as a user would paste them."""
    text = README.read_text()
    found = re.search(r"\*\*Uninstall\*\*.*?```sh\n(.*?)```", text, re.S)
    assert found, f"{README} has no **Uninstall** section with an sh block"
    return found.group(1)


def uninstall(lab) -> None:
    """The README's uninstall, run on the director as written there."""
    lab.director(documented_uninstall(), timeout=120)


def held_for(lab, owner: str, want=(), timeout: float = 20) -> tuple[list[str], list[str]]:
    """What the runtime holds for stack `owner`: the lines of `ipvs-ingress status` that name it
    (the record and the live table, read now), and the services (sorted) of the runtime's own
    view in its status file. The view is the last full pass's, and full passes wait while a
    provider is busy: polled until it holds `want`, or `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        saved = json.loads(lab.director(f"cat {STATUS_JSON}").stdout)
        services = sorted(k for k, s in saved["services"].items() if s.get("owner") == owner)
        if services == sorted(want) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    _, lines = status(lab)
    return [line for line in lines if owner in line], services
