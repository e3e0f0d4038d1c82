"""A director that is not ready gives one line naming the director and the fix, through gRPC.

Each case breaks the lab director on purpose (in its tmpfs overlay) and restores it after.
"""

from __future__ import annotations

import grpc
import pytest

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
        return err.value.details()
    finally:
        srv.close()


def create_error_while(lab, break_it: str, restore: str) -> str:
    """The create error while the director is broken by `break_it`; `restore` always runs."""
    lab.director(break_it)
    try:
        return create_error(lab)
    finally:
        lab.director(restore)


def test_pyroute2_missing(lab):
    pth = f"{lab.art.vm_site_packages}/ipvs-ingress-lab.pth"
    msg = create_error_while(lab, f"mv {pth} /root/lab.pth", f"mv /root/lab.pth {pth}")
    assert msg.startswith(f"director {lab.director_ip}: python3 cannot import pyroute2")
    assert msg.endswith(
        "install it on the director (pip install pyroute2==0.9.7) or set director.bootstrap: true"
    )
    assert "\n" not in msg


def test_pyroute2_too_old(lab):
    fake = f"{lab.art.vm_site_packages}/pyroute2"
    msg = create_error_while(
        lab, f'mkdir -p {fake} && echo "{FAKE_OLD}" > {fake}/__init__.py', f"rm -rf {fake}"
    )
    assert msg.startswith(
        f"director {lab.director_ip}: pyroute2 0.7.2 has no IPVS support (needs >= 0.9.5)"
    )
    assert "pip install pyroute2==0.9.7" in msg and "\n" not in msg


def test_kernel_without_ipvs(lab):
    # Unload IPVS and make loading it fail, as on a kernel built without it.
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
    assert "\n" not in msg
