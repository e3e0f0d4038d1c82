"""Plain OpenSSH to the lab director: baselines (b) and (c), and housekeeping between phases.

Measured sessions are the system `ssh` client run inside the lab's namespace with the pinned
host key, each one a full handshake: connection sharing is switched off. Housekeeping between
phases (reset, checks) goes over the lab's multiplexed connection and is never timed.
"""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
import time

from bench.results import BenchError, Phase
from bench.workload import SCHEDULER, VIP_PREFIX, Workload, normalize_dump

SESSION_TIMEOUT = 60.0
PROGRESS_EVERY = 50  # sessions; the per-rule phase is the long one
STATE_FILE = "/var/lib/ipvs-ingress/state.json"  # providers/ownership.py STATE_PATH
RUN_DIR = "/run/ipvs-ingress"  # providers/ownership.py RUN_DIR: the director lock is in it
UNIT = "ipvs-ingress.service"
INSTALL_DIR = "/usr/local/lib/ipvs-ingress"
COMMAND = "/usr/local/sbin/ipvs-ingress"


def fresh_ssh_argv(lab, command: str) -> list[str]:
    argv = lab.ssh_argv(command)
    # ssh keeps the first value it is given for an option, so these win over any master socket
    # the lab's own argv names: every measured session pays a full handshake.
    at = argv.index("ssh") + 1
    return [*argv[:at], "-o", "ControlMaster=no", "-o", "ControlPath=none", *argv[at:]]


def session(lab, command: str, stdin: str | None = None) -> str:
    """One fresh SSH session running `command`; its stdout, or BenchError."""
    try:
        proc = subprocess.run(
            fresh_ssh_argv(lab, command),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=SESSION_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"ssh director {command!r} took over {SESSION_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise BenchError(
            f"ssh director {command!r} exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
        )
    return proc.stdout


def calibrate(lab, probes: int = 4) -> float:
    """Median seconds of one fresh session running one ipvsadm rule: the per-rule phase's unit.

    The probe rules add and delete a TEST-NET-1 service outside the benchmark's table.
    """
    times = []
    for n in range(probes):
        rule = "-A -t 192.0.2.1:9 -s wlc" if n % 2 == 0 else "-D -t 192.0.2.1:9"
        started = time.monotonic()
        session(lab, f"ipvsadm {rule}")
        times.append(time.monotonic() - started)
    return statistics.median(times)


def per_rule(lab, workload: Workload) -> Phase:
    """(b) One SSH session per rule, one after the other, as a shell loop over ipvsadm would."""
    rules = workload.rules()
    step = max(PROGRESS_EVERY, len(rules) // 10)
    started = time.monotonic()
    for n, rule in enumerate(rules, 1):
        session(lab, f"ipvsadm {rule}")
        if n % step == 0 and n < len(rules):
            elapsed = time.monotonic() - started
            print(f"  per-rule: {n}/{len(rules)} sessions, {elapsed:.0f} s", file=sys.stderr)
    return Phase(
        "(b) per-rule",
        f"ssh director ipvsadm -A/-a x{len(rules)}",
        time.monotonic() - started,
        handshakes=len(rules),
        kernel_changes=len(rules),
        requests=len(rules),
    )


def floor(lab, workload: Workload) -> Phase:
    """(c) The whole table as one ipvsadm-restore batch over one SSH session."""
    batch = workload.restore_batch()
    started = time.monotonic()
    session(lab, "ipvsadm-restore", stdin=batch)
    return Phase(
        "(c) floor",
        "ssh director ipvsadm-restore x1",
        time.monotonic() - started,
        handshakes=1,
        kernel_changes=workload.rule_count,
        requests=1,
    )


def dump(lab, workload: Workload) -> Phase:
    """Reading the whole table back over one SSH session: what refresh is measured against."""
    started = time.monotonic()
    text = session(lab, "ipvsadm -Sn")
    seconds = time.monotonic() - started
    if normalize_dump(text) != workload.expected_dump():
        raise BenchError("ipvsadm -Sn after the floor phase does not show the benchmark table")
    return Phase(
        "dump", "ssh director ipvsadm -Sn x1", seconds, handshakes=1, kernel_changes=0, requests=1
    )


def reset(lab, workload: Workload, warm: bool = False) -> None:
    """Back to an empty table: no services, no VIPs, no ipvs-ingress ownership records.

    Under the director lock, the record first: the runtime then has nothing to restore. With
    `warm`, also uninstall the runtime (the README's steps), so that the install phase installs,
    and load the modules and warm the director's page cache (the lab reads python3, pyroute2 and
    ipvsadm over 9p), so no phase pays a one-time cost a real director would not.
    """
    vips = " ".join(workload.vips)
    warm_up = (
        f"systemctl disable --now {UNIT} 2>/dev/null; rm -f /etc/systemd/system/{UNIT} "
        f"{COMMAND}; systemctl daemon-reload; rm -rf {INSTALL_DIR} && "
        f"modprobe ip_vs && modprobe ip_vs_{SCHEDULER} && "
        "python3 -c 'from pyroute2 import IPVS, IPRoute' && "
        if warm
        else ""
    )
    clear = (
        f"rm -f {STATE_FILE} && ipvsadm -C && "
        f"for vip in {vips}; do ip addr del $vip/32 dev {lab.interface} 2>/dev/null || true; done"
    )
    lab.director(
        f"{warm_up}mkdir -p {RUN_DIR} && flock {RUN_DIR}/lock sh -c {shlex.quote(clear)}",
        timeout=120,
    )
    left = lab.director(
        f"ipvsadm -Sn; ip -o -4 addr show dev {lab.interface}; ls {STATE_FILE} 2>/dev/null",
        check=False,
    ).stdout
    stale = [
        line
        for line in left.splitlines()
        if line.startswith("-") or VIP_PREFIX in line or line.endswith("state.json")
    ]
    if stale:
        raise BenchError(f"could not reset the director, still there: {stale[:3]}")


def check_table(lab, workload: Workload, phase: str, changed: bool = False) -> None:
    """After a phase, the director must hold exactly the benchmark table (ipvsadm is the oracle)."""
    got = normalize_dump(lab.ipvsadm_sn())
    want = workload.expected_dump(changed)
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        raise BenchError(
            f"after {phase} the director's table is wrong: missing {missing}, unexpected {extra}"
        )
