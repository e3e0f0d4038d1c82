"""The director bootstrap scripts: valid shell, idempotent, pinned, and run as root."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from components import bootstrap
from providers.model import Director

DIRECTOR = Director(host="203.0.113.2", host_key="ssh-ed25519 AAAA")
SCRIPTS = {
    "packages": bootstrap.packages_script(),
    "modules": bootstrap.modules_script(("wlc", "sh", "wlc")),
    "sysctl": bootstrap.sysctl_script(),
}


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("user", ["root", "admin"])
def test_commands_are_valid_shell(name, user):
    director = Director(host=DIRECTOR.host, host_key=DIRECTOR.host_key, user=user)
    command = bootstrap.as_root(director, SCRIPTS[name])
    assert command.startswith("sh -euc " if user == "root" else "sudo -n sh -euc ")
    # The outer quoting survives a shell, and the script inside parses.
    inner = shlex.split(command)[-1]
    assert inner == SCRIPTS[name]
    subprocess.run(["sh", "-n", "-c", inner], check=True)


def test_modules_are_ip_vs_and_each_scheduler_once():
    assert bootstrap.modules(("wlc", "sh", "wlc")) == ["ip_vs", "ip_vs_sh", "ip_vs_wlc"]
    script = SCRIPTS["modules"]
    assert f"> {bootstrap.MODULES_FILE}" in script
    assert "ip_vs\nip_vs_sh\nip_vs_wlc\n" in script
    assert 'modprobe "$m"' in script


def test_sysctl_is_persisted_and_applied():
    script = SCRIPTS["sysctl"]
    assert f"net.ipv4.ip_forward = 1\\n' > {bootstrap.SYSCTL_FILE}" in script
    assert "sysctl -q -w net.ipv4.ip_forward=1" in script


def test_packages_install_only_what_is_missing():
    script = SCRIPTS["packages"]
    # Package managers run only when the check fails; pip only when pyroute2 is too old.
    assert "dpkg -s ipvsadm python3-pip >/dev/null 2>&1 ||" in script
    assert "rpm -q ipvsadm python3-pip >/dev/null 2>&1 ||" in script
    assert (
        "2>/dev/null || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q pyroute2==0.9.7"
        in script
    )


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.9.7", True), ("0.9.5", True), ("0.9.4", False), ("0.7.12", False), ("1.0.0", True)],
)
def test_pyroute2_version_check(version, ok, tmp_path):
    # Run the exact check against a fake installed distribution of that version.
    dist = tmp_path / f"pyroute2-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: pyroute2\nVersion: {version}\n")
    check = bootstrap.PYROUTE2_CHECK
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); {check}"]
    )
    assert (result.returncode == 0) is ok
