"""`python -m bench [--services S] [--real-servers R] [--smoke] [--budget SECONDS]` (as root).

Boots its own director lab (tests/lab), runs every phase of issue 4 once, prints the table,
whether each goal is met, and last one JSON line. Progress goes to stderr. Exit 0 when the run
completed (met or missed goals alike: they are the result, not a failure), 1 when a phase failed
or the lab could not start, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

from bench import director
from bench.results import BenchError
from bench.run import run

DEFAULT_SERVICES = 100
DEFAULT_REAL_SERVERS = 10
SMOKE = (2, 2)
MAX_REAL_SERVERS = 50  # the lab's node limit
# Beyond the per-rule phase, the run spends about this much: a fixed part (provider processes,
# agent starts, resets) and, per service, its create, read and checks under TCG.
FIXED_SECONDS = 60.0
PER_SERVICE_SECONDS = 0.5
SESSION_MARGIN = 1.15  # a loop of sessions ran ~15% slower than the calibration probes


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="ipvs-ingress vs per-rule ipvsadm vs one ipvsadm-restore, on the lab director",
    )
    parser.add_argument(
        "--services",
        "-S",
        type=int,
        metavar="S",
        help=f"virtual services (default {DEFAULT_SERVICES}, lowered to fit "
        "--budget when a fresh SSH session is slow, e.g. under TCG)",
    )
    parser.add_argument(
        "--real-servers",
        "-R",
        type=int,
        metavar="R",
        help=f"real servers per service (default {DEFAULT_REAL_SERVERS}, "
        f"at most {MAX_REAL_SERVERS})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run for CI: S={SMOKE[0]}, R={SMOKE[1]} unless given",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="wall time the whole run should fit in when S is chosen automatically (default 600)",
    )
    args = parser.parse_args(argv)
    if args.real_servers is None:
        args.real_servers = SMOKE[1] if args.smoke else DEFAULT_REAL_SERVERS
    if not 1 <= args.real_servers <= MAX_REAL_SERVERS:
        parser.error(f"--real-servers must be 1..{MAX_REAL_SERVERS}")
    if args.services is None and args.smoke:
        args.services = SMOKE[0]
    if args.services is not None and args.services < 1:
        parser.error("--services must be at least 1")
    return args


def choose_services(lab, real_servers: int, budget: float, spent: float) -> tuple[int, str]:
    """The largest S up to the default whose run fits the budget, from one SSH session's cost."""
    session = director.calibrate(lab)
    per_service = (real_servers + 1) * session * SESSION_MARGIN + PER_SERVICE_SECONDS
    fits = math.floor((budget - spent - FIXED_SECONDS) / per_service)
    services = max(2, min(DEFAULT_SERVICES, fits))
    why = f"a fresh SSH session running ipvsadm takes {session:.2f} s"
    if services < DEFAULT_SERVICES:
        full = DEFAULT_SERVICES * (real_servers + 1) * session
        why += (f", so S={DEFAULT_SERVICES} would spend ~{full:.0f} s in the per-rule phase alone;"
                f" S={services} fits the {budget:.0f} s budget")  # fmt: skip
    return services, why


def _boot(real_servers: int):
    from tests.lab import provision, vm
    from tests.lab.harness import Lab

    if os.geteuid() != 0:
        raise BenchError("the director lab needs root (network namespaces, tap, iptables)")
    artifacts = provision.provision()
    reason = vm.can_start()
    if reason:
        raise BenchError(f"the director lab cannot start: {reason}")
    return Lab(nodes=max(2, real_servers), artifacts=artifacts, init="systemd").start()


def main(argv: list[str] | None = None, lab=None) -> int:
    """Run the benchmark; on `lab` (a started Lab) if given, else on a lab booted for it."""
    args = _parse(argv)
    started = time.monotonic()
    own_lab = lab is None
    try:
        if own_lab:
            print(f"booting the director lab ({max(2, args.real_servers)} nodes)...",
                  file=sys.stderr, flush=True)  # fmt: skip
            lab = _boot(args.real_servers)
        services, why = args.services, "given"
        if services is None:
            services, why = choose_services(
                lab, args.real_servers, args.budget, time.monotonic() - started
            )
        print(f"S={services} R={args.real_servers} ({why})", file=sys.stderr, flush=True)
        result = run(lab, services, args.real_servers)
    except (BenchError, ValueError, RuntimeError, subprocess.SubprocessError) as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    finally:
        if own_lab and lab is not None:
            lab.close()
    print(f"S={services} R={args.real_servers} ({why}); "
          f"run took {time.monotonic() - started:.0f} s")  # fmt: skip
    print(result.render())
    print(result.json_line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
