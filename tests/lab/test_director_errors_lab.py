"""A director that is not ready gives one line naming the director and the fix, through gRPC,
and nothing on it changes.

The pyroute2 and IPVS cases break the session's lab director on purpose (in its tmpfs overlay)
and restore it after; for the pyroute2 ones the runtime is uninstalled first (the README's
steps), so the provider's install is what finds them. A director without systemd is a lab of
its own with the busybox init (marked slow_lab: a second VM).
"""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import _say, own_lab
from tests.lab import ops
from tests.lab.test_provider_lab import vs_props
from tests.provider.grpc_client import ProviderServer

pytestmark = pytest.mark.lab

FAKE_OLD = "import sys; __version__ = '0.7.2'"


def create_error(lab) -> str:
    srv = ProviderServer()
    try:
        srv.configure({"ipvs-ingress:sshPrivateKey": lab.private_key_pem})
        inputs, _ = srv.check(vs_props(lab, port=5000))
        with pytest.raises(grpc.RpcError) as err:
            srv.create(inputs, timeout=120)
        msg = err.value.details()
        assert "\n" not in msg and "Traceback" not in msg, msg
        return msg
    finally:
        srv.close()


def create_error_while(lab, break_it: str, restore: str) -> str:
    """The create error while the director is broken by `break_it`; `restore` always runs."""
    lab.director(break_it)
    try:
        return create_error(lab)
    finally:
        lab.director(restore)


def footprint(lab) -> dict[str, str]:
    """What a failed install or create must leave as it was: ipvs-ingress's files, the interpreters
    on the director, IPVS, forwarding and the addresses."""
    files = " ".join((ops.INSTALL_DIR, ops.UNIT_PATH, ops.COMMAND, ops.STATE))
    checks = {
        "files": f"ls -d {files} 2>/dev/null; true",
        "interpreters": "pgrep -f '^python3 -u -c' || true",
        "ipvs": "cat /proc/net/ip_vs 2>/dev/null || echo 'ip_vs not loaded'",
        "forwarding": "cat /proc/sys/net/ipv4/ip_forward",
        "addresses": f"ip -o addr show dev {lab.interface}",
    }
    return {name: lab.director(cmd).stdout for name, cmd in checks.items()}


@pytest.fixture
def no_runtime(lab):
    ops.clear(lab)
    ops.uninstall(lab)
    before = footprint(lab)
    assert before["files"] == "", before["files"]
    yield before
    assert footprint(lab) == before  # the failed install wrote and started nothing


def test_pyroute2_missing(lab, no_runtime):
    pth = f"{lab.art.vm_site_packages}/ipvs-ingress-lab.pth"
    msg = create_error_while(lab, f"mv {pth} /root/lab.pth", f"mv /root/lab.pth {pth}")
    assert msg.startswith(f"director {lab.director_ip}: python3 cannot import pyroute2")
    assert msg.endswith(
        "install it on the director (pip install pyroute2==0.9.7) or set director.bootstrap: true"
    )


def test_pyroute2_too_old(lab, no_runtime):
    fake = f"{lab.art.vm_site_packages}/pyroute2"
    msg = create_error_while(
        lab, f'mkdir -p {fake} && echo "{FAKE_OLD}" > {fake}/__init__.py', f"rm -rf {fake}"
    )
    assert msg.startswith(
        f"director {lab.director_ip}: pyroute2 0.7.2 has no IPVS support (needs >= 0.9.5)"
    )
    assert "pip install pyroute2==0.9.7" in msg


def test_kernel_without_ipvs(lab):
    ops.clear(lab)
    # Unload IPVS and make loading it fail, as on a kernel built without it. The runtime (the
    # create installs it if need be) loads ip_vs only for what it keeps: nothing here.
    msg = create_error_while(
        lab,
        "ipvsadm -C; for m in $(awk '/^ip_vs_/ {print $1}' /proc/modules); do rmmod $m; done; rmmod ip_vs;"
        " echo 'install ip_vs /bin/false' > /etc/modprobe.d/no-ipvs.conf",
        "rm -f /etc/modprobe.d/no-ipvs.conf",
    )
    assert msg.startswith(f"director {lab.director_ip}: the kernel has no IPVS")
    assert msg.endswith(
        "use a kernel with CONFIG_IP_VS (Debian's stock kernel has it) or set director.bootstrap: true"
    )


@pytest.fixture(scope="module")
def busybox_lab(request):
    with own_lab(request, "busybox lab (no systemd)", init="busybox") as lab:
        yield lab


@pytest.mark.slow_lab  # a second VM
def test_a_director_without_systemd_is_one_line_and_nothing_changes(busybox_lab, request):
    lab = busybox_lab
    before = footprint(lab)
    msg = create_error(lab)
    # Stage 2 of the busybox lab is a shell script running as PID 1.
    assert msg.startswith(f"director {lab.director_ip}: the director runs no systemd (PID 1 is sh)")
    assert msg.endswith("run the director on a systemd distribution (Debian's default init) so that the runtime can keep the table")  # fmt: skip
    _say(request, f"busybox lab: {msg}")
    assert footprint(lab) == before
    assert before["ipvs"].strip() == "ip_vs not loaded" and before["files"] == ""
