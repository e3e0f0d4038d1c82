"""The bootstrap scripts that pulumi-command runs, run for real on the lab director.

The package step needs a package mirror, which the lab has not; its pyroute2 probe runs here.
"""

from __future__ import annotations

import shlex

import pytest

from components import bootstrap
from providers.model import Director

pytestmark = pytest.mark.lab


def run(lab, script: str):
    director = Director(host=lab.director_ip, host_key=lab.host_key_line)
    return lab.director(bootstrap.as_root(director, script), check=False)


def test_modules_script_persists_and_loads_the_schedulers(lab):
    first = run(lab, bootstrap.modules_script(("rr", "sh")))
    again = run(lab, bootstrap.modules_script(("rr", "sh")))  # idempotent
    assert (first.returncode, again.returncode) == (0, 0), first.stderr + again.stderr
    listed = lab.director(f"cat {bootstrap.MODULES_FILE}").stdout.split()
    assert listed == ["ip_vs", "ip_vs_rr", "ip_vs_sh"]
    for module in listed:
        assert lab.director(f"test -d /sys/module/{module}", check=False).returncode == 0, module


def test_sysctl_script_turns_forwarding_on_now_and_at_boot(lab):
    lab.director("sysctl -q -w net.ipv4.ip_forward=0")
    assert run(lab, bootstrap.sysctl_script()).returncode == 0
    assert lab.director("cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    assert "net.ipv4.ip_forward = 1" in lab.director(f"cat {bootstrap.SYSCTL_FILE}").stdout


def test_pyroute2_probe_accepts_the_directors_pyroute2(lab):
    probe = lab.director(f"python3 -c {shlex.quote(bootstrap.PYROUTE2_CHECK)}", check=False)
    assert probe.returncode == 0, probe.stderr
