"""Prepare the director over SSH with pulumi-command (director.bootstrap: true).

Three small commands, so a preview shows which part changes: packages, kernel modules at boot,
and the ip_forward sysctl. Each script is idempotent, so re-running one (an update, or a replace
after the scheduler list changed) is harmless.
"""

from __future__ import annotations

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
        f'for m in {" ".join(names)}; do modprobe "$m"; done\n'
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
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ipvs-ingress:index:DirectorBootstrap", name, None, opts)
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
        self.commands = [
            remote.Command(
                f"{name}-{step}",
                connection=connection,
                create=as_root(director, script),
                update=as_root(director, script),
                delete=as_root(director, delete) if delete else None,
                opts=child,
            )
            for step, (script, delete) in steps.items()
        ]
        self.register_outputs({})
