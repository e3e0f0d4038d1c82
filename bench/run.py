"""The benchmark's core: every phase of issue 4 against one booted Lab, in one run.

Order: (0) the provider installs the runtime; (a) create with ipvs-ingress, refresh, refresh
again, one change; reset; (b) per-rule ipvsadm; reset;
(c) the ipvsadm-restore floor and the `ipvsadm -Sn` dump. After each phase the director's table
is checked with ipvsadm; between phases it is reset (never timed). The benchmark owns the
director's IPVS table while it runs and leaves it empty.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench import director, provider
from bench.results import Result
from bench.workload import Workload


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _leave_clean(lab, workload: Workload) -> None:
    try:
        director.reset(lab, workload)
    except Exception as err:  # the phase's own error is the one to report
        _say(f"could not reset the director after the failure: {err}")


def run(lab, services: int, real_servers: int) -> Result:
    """Measure S x R on `lab` (a started tests.lab.harness.Lab with at least R nodes)."""
    if real_servers > len(lab.node_ips):
        raise ValueError(f"R={real_servers} needs a lab with {real_servers} nodes, "
                         f"this one has {len(lab.node_ips)}")  # fmt: skip
    workload = Workload.build(services, lab.node_ips[:real_servers])
    rules = workload.rule_count
    with tempfile.TemporaryDirectory(prefix="ipvs-ingress-bench-") as tmp:
        logs = Path(tmp)
        director.reset(lab, workload, warm=True)
        try:
            _say("(0) install: the provider installs the director's runtime")
            install = provider.install_runtime(lab, workload, logs / "install.log")
            _say(f"(a) create: {services} virtual services, {rules} rules, through the provider")
            create, created = provider.create_all(lab, workload, logs / "create.log")
            director.check_table(lab, workload, "create")
            _say(f"refresh: {services} reads")
            refresh = provider.refresh_all(lab, created, logs / "refresh.log")
            _say(f"refresh 2: {services} reads, in a new provider process again")
            refresh2 = provider.refresh_all(lab, created, logs / "refresh2.log", "refresh 2")
            _say("one change: one weight")
            change = provider.change_one(lab, workload, created, logs / "change.log")
            director.check_table(lab, workload, "one change", changed=True)
            director.reset(lab, workload)

            _say(f"(b) per-rule: {rules} SSH sessions")
            per_rule = director.per_rule(lab, workload)
            director.check_table(lab, workload, "per-rule")
            director.reset(lab, workload)

            _say("(c) floor: one ipvsadm-restore batch, then one ipvsadm -Sn dump")
            floor = director.floor(lab, workload)
            dump = director.dump(lab, workload)
        except BaseException:
            _leave_clean(lab, workload)
            raise
        director.reset(lab, workload)
    return Result(
        services, real_servers, install, create, refresh, refresh2, change, per_rule, floor, dump
    )
