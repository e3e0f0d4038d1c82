"""The director bootstrap scripts: valid shell, idempotent, pinned, and run as root."""

from __future__ import annotations

import shlex
import shutil
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
    "keepalived": bootstrap.keepalived_script(),
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


# --- keepalived for a director of several (issue 10), run against stub commands ---------------


def _stub(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$LOG"\n{body}\n')
    path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
    """A PATH of stub package managers and systemctl that log their arguments: installing
    keepalived makes a `keepalived` command and the distribution's unit appear."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sh").symlink_to("/bin/sh")  # the command is `sh -euc ...`, found on PATH
    (bin_ / "mkdir").symlink_to(shutil.which("mkdir"))  # for the marker's folder
    install = (
        f"printf '#!/bin/sh\\n' > {bin_}/keepalived && /bin/chmod +x {bin_}/keepalived"
        f" && : > {tmp_path}/unit"
    )
    _stub(bin_, "apt-get", f'case "$1" in install) {install};; esac')
    _stub(bin_, "dnf", f'case "$1" in install) {install};; esac')
    _stub(bin_, "systemctl", f'[ "$1" != cat ] || [ -e {tmp_path}/unit ]')
    return tmp_path


def run_keepalived(folder) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = folder / "log"
    log.write_text("")
    mark = folder / "var" / "lib" / "ipvs-ingress" / "keepalived-installed-by-ipvs-ingress"
    root = Director(host=DIRECTOR.host, host_key=DIRECTOR.host_key, user="root")
    # The command exactly as the Command resource runs it, with only the stubs on PATH.
    result = subprocess.run(
        ["/bin/sh", "-c", bootstrap.as_root(root, bootstrap.keepalived_script(str(mark)))],
        env={"PATH": str(folder / "bin"), "LOG": str(log)},
        capture_output=True,
        text=True,
    )
    return result, log.read_text().splitlines()


def test_keepalived_is_installed_with_apt_once_and_the_distributions_unit_stays_off(stubs):
    result, calls = run_keepalived(stubs)
    assert result.returncode == 0, result.stderr
    assert calls == [
        "apt-get update -q",
        "apt-get install -y -q --no-install-recommends keepalived",
        "systemctl cat keepalived.service",
        "systemctl disable --now keepalived.service",
    ]
    # Again (an update): nothing installed, the unit disabled and stopped again.
    result, calls = run_keepalived(stubs)
    assert result.returncode == 0 and calls == [
        "systemctl cat keepalived.service",
        "systemctl disable --now keepalived.service",
    ]


def test_keepalived_is_installed_with_dnf_where_there_is_no_apt(stubs):
    (stubs / "bin" / "apt-get").unlink()
    result, calls = run_keepalived(stubs)
    assert result.returncode == 0, result.stderr
    assert calls[0] == "dnf install -y -q keepalived"
    assert calls[-1] == "systemctl disable --now keepalived.service"


def test_keepalived_without_a_package_manager_is_one_line_and_nonzero(stubs):
    for name in ("apt-get", "dnf"):
        (stubs / "bin" / name).unlink()
    result, calls = run_keepalived(stubs)
    assert result.returncode == 1 and calls == []
    assert result.stderr == "ipvs-ingress: no apt-get or dnf on the director: install keepalived\n"


def test_no_unit_to_disable_without_systemd_or_without_the_distributions_unit(stubs):
    (stubs / "bin" / "systemctl").unlink()
    result, calls = run_keepalived(stubs)
    assert result.returncode == 0 and "systemctl" not in " ".join(calls)
    _stub(stubs / "bin", "systemctl", f'[ "$1" != cat ] || [ -e {stubs}/no-unit ]')
    result, calls = run_keepalived(stubs)  # keepalived is there now, its unit file is not
    assert result.returncode == 0 and calls == ["systemctl cat keepalived.service"]


def test_a_failing_disable_fails_the_command(stubs):
    _stub(stubs / "bin", "systemctl", '[ "$1" = cat ]')  # the unit exists, disable fails
    result, calls = run_keepalived(stubs)
    assert result.returncode != 0 and calls[-1] == "systemctl disable --now keepalived.service"


def test_scheduler_names_reach_the_shell_quoted():
    # Checked against a fixed list before, and quoted all the same (no config value unquoted).
    script = bootstrap.modules_script(("wlc",))
    assert "for m in ip_vs ip_vs_wlc; do" in script
    hostile = bootstrap.modules_script(("x; touch /tmp/pwned",))
    assert "for m in ip_vs 'ip_vs_x; touch /tmp/pwned'; do" in hostile


def test_an_operators_own_keepalived_and_its_unit_are_left_alone(stubs):
    """keepalived was there before ipvs-ingress (the operator's, maybe running their own VRRP
    from /etc/keepalived): its unit is not ipvs-ingress's to disable or stop."""
    _stub(stubs / "bin", "keepalived", "")
    (stubs / "unit").write_text("")  # the distribution's unit exists, the operator's
    result, calls = run_keepalived(stubs)
    assert result.returncode == 0, result.stderr
    assert not any(c.startswith(("systemctl disable", "systemctl stop")) for c in calls), calls
    assert not any(c.startswith(("apt-get", "dnf")) for c in calls), calls


def test_a_kill_after_the_install_still_disables_the_unit_on_the_next_run(stubs):
    """Installed by ipvs-ingress but killed before the disable: the next run (keepalived now
    present) still knows it installed it, and disables the distribution's unit."""
    # The disable step fails: as if cut before it.
    _stub(stubs / "bin", "systemctl", '[ "$1" != cat ] || exit 0; exit 9')
    result, calls = run_keepalived(stubs)
    assert result.returncode != 0 and any(c.startswith("apt-get install") for c in calls)
    _stub(stubs / "bin", "systemctl", f'[ "$1" != cat ] || [ -e {stubs}/unit ]')
    result, calls = run_keepalived(stubs)
    assert result.returncode == 0, result.stderr
    assert calls[-1] == "systemctl disable --now keepalived.service"
    assert not any(c.startswith("apt-get install") for c in calls)
