"""The systemd lab (`Lab()`, init systemd): systemd as the director's PID 1, a disk that survives
a clean reboot and a power cut, units enabled at run time that come back at boot, and the
product's directories (state, installed runtime, settings) on that disk.

The module boots its own lab (not the session's: it reboots it) and tears it down at the end.
Marked `slow_lab` too: `-m "not slow_lab"` skips it, `-m slow_lab` runs it alone.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
from pathlib import Path

import pytest

from providers import ownership, runtime
from tests.conftest import _say, own_lab
from tests.lab import harness, initramfs, provision, state, vm


def slow_lab(test):
    """The lab tests of this module; the others here need no VM."""
    return pytest.mark.lab(pytest.mark.slow_lab(test))


PROBE_UNIT = "lab-probe.service"
PROBE_FILE = "/run/lab-probe.boot-id"  # /run is new at every boot: the file says which boot ran it
PROBE_SERVICE = "203.0.113.250:80"
# Enabled at run time into /etc/systemd/system, whose upper layer is on the lab's disk.
PROBE = f"""[Unit]
Description=ipvs-ingress lab probe: proves units enabled at run time start at boot

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ipvsadm -A -t {PROBE_SERVICE}
ExecStart=/bin/sh -c 'cat /proc/sys/kernel/random/boot_id > {PROBE_FILE}'

[Install]
WantedBy=multi-user.target
"""
# Failed units that would be the lab's own fault: its sshd, its probe, its disk's mounts.
OURS = re.compile(r"^(lab-|ipvs-ingress|lab\\x2ddisk|etc\.mount|usr-local\.mount|var-lib\.mount)")

_qemus_seen: list[dict] = []  # every qemu of the module's lab, for the teardown check


@pytest.fixture(scope="module")
def sd_lab(request: pytest.FixtureRequest):
    with own_lab(request, "systemd lab", init="systemd") as lab:
        yield lab


def _remember_qemu(lab: harness.Lab) -> None:
    _qemus_seen.extend(p for p in lab.footprint()["procs"] if p["what"] == "qemu")


def boot_id(lab: harness.Lab) -> str:
    return lab.director("cat /proc/sys/kernel/random/boot_id").stdout.strip()


def assert_up(request: pytest.FixtureRequest, lab: harness.Lab, when: str) -> None:
    """Once boot is over: running, or degraded by nothing of the lab's own. Prints systemd's
    own account of the boot."""
    out = lab.director(
        "systemctl is-system-running --wait; systemd-analyze | head -1; "
        "systemctl list-units --failed --plain --no-legend",
        check=False,
        timeout=150,
    ).stdout.splitlines()
    assert len(out) >= 2, f"no answer from systemctl / systemd-analyze: {out}"
    status, analyze, failed = out[0], out[1], [line.split()[0] for line in out[2:] if line]
    _say(request, f"systemd lab, {when}: {status}; {analyze.strip()}")
    if failed:
        _say(request, f"systemd lab, {when}: failed units: {' '.join(failed)}")
    assert status in ("running", "degraded"), (status, failed)
    assert status == "running" or failed, status
    assert [unit for unit in failed if OURS.match(unit)] == []


def enable_probe(lab: harness.Lab) -> None:
    path = f"/etc/systemd/system/{PROBE_UNIT}"
    lab.director(
        f"printf %s {shlex.quote(PROBE)} > {path} && systemctl daemon-reload && "
        f"systemctl enable {PROBE_UNIT} 2>&1 && sync"  # the enable link must survive a power cut
    )


def assert_probe_ran_this_boot(lab: harness.Lab) -> None:
    out = lab.director(
        f"cat /proc/sys/kernel/random/boot_id {PROBE_FILE}; systemctl is-enabled {PROBE_UNIT}; "
        "ipvsadm -Ln"
    ).stdout.splitlines()
    boot, ran_at, enabled, table = out[0], out[1], out[2], out[3:]
    assert ran_at == boot  # /run is new at every boot: the unit ran at this one
    assert enabled == "enabled"
    assert any(line.startswith(f"TCP  {PROBE_SERVICE}") for line in table), table


def write_synced(lab: harness.Lab, name: str) -> dict[str, str]:
    """{path: token}: a token in a new file under each of the product's directories, fsynced
    with its directory."""
    written = {}
    for folder in initramfs.PERSISTENT_DIRS:
        path, token = f"{folder}/{name}", secrets.token_hex(16)
        lab.director(f"mkdir -p {folder} && printf %s {token} > {path} && sync {path} {folder}")
        written[path] = token
    return written


def assert_kept(lab: harness.Lab, written: dict[str, str]) -> None:
    for path, token in written.items():
        assert lab.director(f"cat {path}").stdout == token, path
        lab.director(f"rm {path}")


@slow_lab
def test_systemd_is_pid1_in_a_vm_and_the_system_runs(sd_lab, request):
    out = sd_lab.director(
        "cat /proc/1/comm; systemd-detect-virt; systemctl is-enabled ssh.service; "
        "findmnt -rn -o TARGET,SOURCE,FSTYPE",
        check=False,
    ).stdout.splitlines()
    pid1, virt, host_sshd, mounts = out[0], out[1], out[2], out[3:]
    assert pid1 == "systemd"
    # Not a container any more (/.dockerenv is gone in the overlay): systemd sees the VM.
    assert virt == "qemu"
    assert host_sshd == "masked-runtime"  # the host's own sshd; the lab runs lab-sshd.service
    for name, tree in initramfs.PERSISTENT_TREES.items():
        assert f"{tree} {name} overlay" in mounts, mounts
    assert_up(request, sd_lab, "first boot")


@slow_lab
def test_clean_reboot_keeps_enabled_units_and_synced_files(sd_lab, request):
    enable_probe(sd_lab)
    machine_id = sd_lab.director("cat /etc/machine-id").stdout
    before = boot_id(sd_lab)
    written = write_synced(sd_lab, "lab-reboot-token")
    _remember_qemu(sd_lab)

    took = sd_lab.reboot()
    _say(
        request,
        f"systemd lab: clean reboot to sshd {took.total:.1f}s "
        f"(systemctl reboot to qemu exit {took.down:.1f}s, qemu start to sshd {took.up:.1f}s)",
    )
    assert_up(request, sd_lab, "after the clean reboot")  # first: waits until boot is over
    assert boot_id(sd_lab) != before
    assert_kept(sd_lab, written)
    assert_probe_ran_this_boot(sd_lab)
    assert sd_lab.director("cat /etc/machine-id").stdout == machine_id


@slow_lab
def test_power_cut_keeps_synced_files_and_enabled_units(sd_lab, request):
    enable_probe(sd_lab)
    before = boot_id(sd_lab)
    written = write_synced(sd_lab, "lab-power-cut-token")
    _remember_qemu(sd_lab)

    took = sd_lab.power_cut()
    _say(
        request,
        f"systemd lab: power cut to sshd {took.total:.1f}s (qemu start to sshd {took.up:.1f}s)",
    )
    assert_up(request, sd_lab, "after the power cut")
    assert boot_id(sd_lab) != before
    assert_kept(sd_lab, written)
    assert_probe_ran_this_boot(sd_lab)


@slow_lab
def test_teardown_kills_every_qemu_and_removes_the_disk(sd_lab):
    _remember_qemu(sd_lab)
    footprint = sd_lab.footprint()
    disk = sd_lab.run_dir / "disk.img"
    assert disk.exists()
    sd_lab.close()
    assert harness.leftovers(footprint) == []
    assert not disk.exists()
    assert [p for p in _qemus_seen if state.Proc(**p).alive()] == []


# -- no VM needed ----------------------------------------------------------------------------


def _artifacts(tmp_path) -> provision.Artifacts:
    files = {name: tmp_path / name for name in ("vmlinux", "initrd", "s2", "s2sd", "sshd", "py")}
    return provision.Artifacts(
        cache=tmp_path,
        kernel_version="6.1.0-0-amd64",
        kernel_tree=tmp_path / "kernel",
        vmlinux=files["vmlinux"],
        initrd=files["initrd"],
        stage2=files["s2"],
        stage2_systemd=files["s2sd"],
        sshd_config=files["sshd"],
        pyroute2_dir=files["py"],
        vm_site_packages="/usr/lib/python3/dist-packages",
        client_key=tmp_path / "k",
        host_key=tmp_path / "h",
        elapsed=0.0,
    )


def test_the_disk_holds_the_directories_the_product_uses():
    # The lab's copies of the paths, checked against the product's own constants.
    assert initramfs.STATE_DIR == os.path.dirname(ownership.STATE_PATH)
    assert initramfs.INSTALL_DIR == runtime.INSTALL_DIR
    assert initramfs.CONFIG_DIR == os.path.dirname(runtime.CONFIG_PATH)
    trees = [Path(t) for t in initramfs.PERSISTENT_TREES.values()]
    for folder in map(Path, initramfs.PERSISTENT_DIRS):
        # Under a tree on the disk, and not a mount point itself: `rm -rf` of it must work.
        assert any(tree in folder.parents for tree in trees), folder


def test_only_the_systemd_lab_gets_a_disk_and_systemd_options(tmp_path):
    art = _artifacts(tmp_path)
    default = vm.qemu_argv(art, tmp_path, "203.0.113.2/24", "x", "busybox")
    systemd = vm.qemu_argv(art, tmp_path, "203.0.113.2/24", "x", "systemd", tmp_path / "d.img")
    cmdline = lambda argv: argv[argv.index("-append") + 1].split()  # noqa: E731
    assert "-drive" not in default
    assert not any(o.startswith(("lab_stage2=", "systemd.", "net.")) for o in cmdline(default))
    assert f"lab_stage2={tmp_path / 's2sd'}" in cmdline(systemd)
    assert "systemd.getty_auto=0" in cmdline(systemd)
    drive = systemd[systemd.index("-drive") + 1]
    assert drive.startswith(f"file={tmp_path / 'd.img'},format=raw")
    # Otherwise the default lab's command line: its options first, then the systemd ones.
    assert cmdline(systemd)[: len(cmdline(default))] == cmdline(default)
    extra = ["-drive", drive, "-device", "virtio-blk-pci,drive=st"]
    assert systemd[-len(extra) :] == extra
    same = lambda argv: [a for a in argv[: len(default)] if "lab_cache=" not in a]  # noqa: E731
    assert same(systemd) == same(default)


def test_reboot_of_a_busybox_lab_says_how_to_get_one(tmp_path):
    run = state.RunState(id="1-abcd", dir=str(tmp_path), owner=state.Proc.of(os.getpid(), "t"))
    vm.save_config(tmp_path, "busybox", ["qemu-system-x86_64"])
    with pytest.raises(ValueError) as err:
        harness.restart_director(run, {}, clean=True)
    assert "\n" not in str(err.value)
    assert "without --init busybox (`./dev lab down && ./dev lab up`)" in str(err.value)
