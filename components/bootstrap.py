"""Prepare the director over SSH with pulumi-command (director.bootstrap: true).

Three small commands, so a preview shows which part changes: packages, kernel modules at boot,
and the ip_forward sysctl; a fourth for a director of several (ipvs-ingress:directors): keepalived.
Each script is idempotent, so re-running one (an update, or a replace after the scheduler list
changed) is harmless. No config value reaches a shell unquoted: the scripts are fixed text, the
scheduler names (checked against a fixed list) are quoted all the same.
"""

from __future__ import annotations

import os
import shlex

import pulumi
from pulumi_command import remote

from providers.model import Director

PYROUTE2 = "pyroute2==0.9.7"  # the runtime needs >= 0.9.5; pin what the tests ran against
MIN_PYROUTE2 = (0, 9, 5)
MODULES_FILE = "/etc/modules-load.d/ipvs-ingress.conf"
SYSCTL_FILE = "/etc/sysctl.d/90-ipvs-ingress.conf"

_PACKAGES = """\
if command -v apt-get >/dev/null 2>&1; then
  dpkg -s ipvsadm python3-pip >/dev/null 2>&1 || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q ipvsadm python3-pip
  }
elif command -v dnf >/dev/null 2>&1; then
  rpm -q ipvsadm python3-pip >/dev/null 2>&1 || dnf install -y -q ipvsadm python3-pip
else
  echo "ipvs-ingress: no apt-get or dnf on the director: install ipvsadm and python3-pip" >&2
  exit 1
fi
"""
# Exits 0 only if an installed pyroute2 is new enough; then pip is not touched.
PYROUTE2_CHECK = (
    "import importlib.metadata as m, sys; "
    "v = tuple(int(x) for x in m.version('pyroute2').split('.')[:3]); "
    f"sys.exit(v < {MIN_PYROUTE2})"
)


def packages_script() -> str:
    # PIP_BREAK_SYSTEM_PACKAGES: Debian 12+ marks the system Python externally managed; older pips
    # ignore the variable.
    return (
        f"{_PACKAGES}python3 -c {shlex.quote(PYROUTE2_CHECK)} 2>/dev/null"
        f" || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q {shlex.quote(PYROUTE2)}\n"
    )


def modules(schedulers: tuple[str, ...]) -> list[str]:
    """ip_vs plus one module per scheduler in use (the kernel names them ip_vs_<scheduler>)."""
    return ["ip_vs", *(f"ip_vs_{s}" for s in sorted(set(schedulers)))]


def modules_script(schedulers: tuple[str, ...]) -> str:
    names = modules(schedulers)
    lines = "".join(f"{m}\n" for m in names)
    return (
        f"printf %s {shlex.quote(lines)} > {MODULES_FILE}\n"
        f'for m in {" ".join(map(shlex.quote, names))}; do modprobe "$m"; done\n'
    )


KEEPALIVED_UNIT = "keepalived.service"  # the distribution's: never used, the runtime has its own
# Written before ipvs-ingress installs keepalived (write-ahead: a kill mid-install still counts):
# only a keepalived ipvs-ingress installed has its distribution unit turned off. One that was
# there before is the operator's, maybe running their own VRRP from /etc/keepalived: left alone.
KEEPALIVED_MARK = "/var/lib/ipvs-ingress/keepalived-installed-by-ipvs-ingress"
# keepalived from the distribution (issue 10: an existing engine), installed only if missing. The
# distribution's unit would run it on /etc/keepalived with its own lifetime: the director's
# runtime runs it as ipvs-ingress-keepalived.service on its own generated config instead, so the
# distribution's is disabled and stopped (a package install may have started it).
_KEEPALIVED = """\
if ! command -v keepalived >/dev/null 2>&1; then
  mkdir -p {folder} && : > {mark}
  if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q --no-install-recommends keepalived
  elif command -v dnf >/dev/null 2>&1; then
    dnf install -y -q keepalived
  else
    echo "ipvs-ingress: no apt-get or dnf on the director: install keepalived" >&2
    exit 1
  fi
fi
if [ -e {mark} ] && command -v systemctl >/dev/null 2>&1 && systemctl cat {unit} >/dev/null 2>&1; then
  systemctl disable --now {unit}
fi
"""


def keepalived_script(mark: str = KEEPALIVED_MARK) -> str:
    return _KEEPALIVED.format(
        folder=shlex.quote(os.path.dirname(mark)), mark=shlex.quote(mark), unit=KEEPALIVED_UNIT
    )


def sysctl_script() -> str:
    return (
        f"printf 'net.ipv4.ip_forward = 1\\n' > {SYSCTL_FILE}\nsysctl -q -w net.ipv4.ip_forward=1\n"
    )


def as_root(director: Director, script: str) -> str:
    """Run a script with `sh -eu`, through non-interactive sudo unless we log in as root."""
    sudo = "" if director.user == "root" else "sudo -n "
    return f"{sudo}sh -euc {shlex.quote(script)}"


class DirectorBootstrap(pulumi.ComponentResource):
    commands: list[remote.Command]

    def __init__(
        self,
        name: str,
        director: Director,
        schedulers: tuple[str, ...],
        private_key: pulumi.Input[str],
        keepalived: bool = False,
        former: str | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ):
        """keepalived: also install keepalived (a director of several). former: the name this
        bootstrap had before (one director <-> several): its commands keep their URNs."""
        super().__init__("ipvs-ingress:index:DirectorBootstrap", name, None, opts)
        self.director = director
        self._above = opts.parent if opts is not None else None
        connection = remote.ConnectionArgs(
            host=director.host,
            port=director.port,
            user=director.user,
            host_key=director.host_key,  # pinned: never trust whatever key answers
            private_key=private_key,
            per_dial_timeout=15,
        )
        # Delete before replace: the old command's delete removes the file the new one writes.
        child = pulumi.ResourceOptions(parent=self, delete_before_replace=True)
        steps = {
            "packages": (packages_script(), None),
            "kernel-modules": (modules_script(schedulers), f"rm -f {MODULES_FILE}"),
            "ip-forward": (sysctl_script(), f"rm -f {SYSCTL_FILE}"),
        }
        if keepalived:  # kept installed on delete (teardown: README); its unit stays disabled
            steps["keepalived"] = (keepalived_script(), None)
        self.commands = []
        for step, (script, delete) in steps.items():
            # keepalived's step runs the package manager too: after the packages' step, or one
            # of the two fails on its lock (apt's /var/lib/dpkg/lock-frontend, dnf's).
            after = self.commands[:1] if step == "keepalived" else []
            opts = pulumi.ResourceOptions.merge(child, self._renamed(former, step))
            self.commands.append(
                remote.Command(
                    f"{name}-{step}",
                    connection=connection,
                    create=as_root(director, script),
                    update=as_root(director, script),
                    delete=as_root(director, delete) if delete else None,
                    opts=pulumi.ResourceOptions.merge(
                        opts, pulumi.ResourceOptions(depends_on=after)
                    ),
                )
            )
        self.register_outputs({})

    def _renamed(self, former: str | None, step: str) -> pulumi.ResourceOptions:
        """The alias of a command under the bootstrap's former name (its own name and its
        parent's both changed, so the parent's alias alone does not cover it)."""
        if former is None:
            return pulumi.ResourceOptions()
        parent = pulumi.create_urn(former, "ipvs-ingress:index:DirectorBootstrap", self._above)
        return pulumi.ResourceOptions(
            aliases=[pulumi.Alias(name=f"{former}-{step}", parent=parent)]
        )
