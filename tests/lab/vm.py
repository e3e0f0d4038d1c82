"""The director VM: qemu under TCG booting the Debian kernel with the host's root over 9p."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.lab.initramfs import MASKED_UNITS, READY_MARKER
from tests.lab.provision import Artifacts

QEMU = "qemu-system-x86_64"


def mac(n: int) -> str:
    """Director n's MAC (a locally administered one of qemu's prefix): ...:02, ...:03."""
    return f"52:54:00:a0:00:{1 + n:02x}"


def tap(n: int) -> str:
    """Director n's tap in the lab namespace, on the bridge: tap0, tap1."""
    return f"tap{n - 1}"


MAC = mac(1)
TAP = tap(1)
# Seen on the serial console when the VM will never get ready.
_FATAL = ("Kernel panic", "stage1:", "stage2:", "internal-error")
INITS = ("busybox", "systemd")
DISK_MIB = 64
# systemd as PID 1: no udev renames eth0, no gettys waiting for devices, errors only on the console.
_CMDLINE_MAX = 2047  # x86 COMMAND_LINE_SIZE, with its NUL
_SYSTEMD_CMDLINE = ("net.ifnames=0", "systemd.getty_auto=0", "systemd.show_status=error")
# Also masked in the lab's VMs: keepalived, which the HA directors need installed on the host
# whose root they share. Its package enables the unit; the director's VRRP must start only when
# ipvs-ingress's runtime says so (a VM booting with it would take VIPs nobody asked for).
LAB_MASKED_UNITS = (*MASKED_UNITS, "keepalived.service")


def qemu_argv(
    art: Artifacts,
    run_dir: Path,
    address: str,
    name: str,
    init: str,
    disk: Path | None = None,
    n: int = 1,
) -> list[str]:
    """qemu's command line for director `n` (its tap and MAC; its files under `run_dir`); with
    `init="systemd"`, stage 2 ends in systemd and `disk` (see make_disk) is the VM's /dev/vda;
    with "busybox", stage 2 is PID 1 and there is no disk."""
    # Values for stage 1 and 2 (see initramfs.py); the kernel ignores unknown parameters.
    cmdline = " ".join(
        [
            "console=ttyS0",
            "panic=-1",
            "loglevel=4",
            "rdinit=/init",
            f"lab_cache={art.cache}",
            f"lab_kver={art.kernel_version}",
            f"lab_addr={address}",
            f"lab_pyroute2={art.pyroute2_dir}",
            f"lab_pysite={art.vm_site_packages}",
        ]
    )
    extra: list[str] = []
    if init == "systemd":
        masks = (f"systemd.mask={unit}" for unit in LAB_MASKED_UNITS)
        cmdline += " " + " ".join((f"lab_stage2={art.stage2_systemd}", *_SYSTEMD_CMDLINE, *masks))
        # Writeback: a guest fsync still reaches the image file (qemu flushes on request).
        extra = [
            "-drive",
            f"file={disk},format=raw,if=none,id=st,cache=writeback",
            "-device",
            "virtio-blk-pci,drive=st",
        ]
    if len(cmdline) > _CMDLINE_MAX:
        raise ValueError(
            f"the director's kernel command line is {len(cmdline)} bytes, over the kernel's "
            f"{_CMDLINE_MAX}: use a shorter IPVS_INGRESS_LAB_CACHE path than {art.cache}"
        )
    return [
        QEMU,
        "-name",
        name,
        # /dev/kvm here cannot boot stock kernels; a 128 MB translation cache keeps RSS modest.
        "-accel",
        "tcg,thread=single,tb-size=128",
        "-cpu",
        "max",
        "-M",
        "q35",
        "-m",
        "256",
        "-smp",
        "1",  # python3 + pyroute2 use ~35 MB of it
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{run_dir / 'serial.log'}",
        "-monitor",
        f"unix:{run_dir / 'monitor.sock'},server=on,wait=off",
        # The ELF vmlinux boots through the PVH entry, skipping the slow in-guest xz.
        "-kernel",
        str(art.vmlinux),
        "-initrd",
        str(art.initrd),
        "-append",
        cmdline,
        "-fsdev",
        "local,id=hr,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hr,mount_tag=hostroot",
        "-netdev",
        f"tap,id=n0,ifname={tap(n)},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev=n0,mac={mac(n)}",
        *extra,
    ]


def make_disk(run_dir: Path) -> Path:
    """A fresh ext4 image for the systemd lab; it lives (and dies) with the run directory."""
    disk = run_dir / "disk.img"
    with open(disk, "wb") as fh:
        fh.truncate(DISK_MIB * 1024 * 1024)
    done = subprocess.run(
        ["mkfs.ext4", "-F", "-q", "-L", "lab-disk", str(disk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"mkfs.ext4 {disk} failed: {done.stderr.strip()}")
    return disk


def save_config(run_dir: Path, init: str, argv: list[str]) -> None:
    """What a later process (`python -m tests.lab reboot`) needs to start this VM again."""
    (run_dir / "vm.json").write_text(json.dumps({"init": init, "argv": argv}))


def load_config(run_dir: Path) -> dict:
    path = run_dir / "vm.json"
    return json.loads(path.read_text()) if path.exists() else {"init": "busybox", "argv": []}


def rotate_logs(run_dir: Path) -> None:
    """Keep the logs of every earlier boot of this run (serial.1.log, ...); qemu truncates."""
    boots = 1 + sum(1 for _ in run_dir.glob("serial.*.log"))
    for name in ("serial", "qemu"):
        path = run_dir / f"{name}.log"
        if path.exists():
            path.rename(run_dir / f"{name}.{boots}.log")


def can_start() -> str | None:
    """Why qemu cannot run here, or None."""
    try:
        subprocess.run([QEMU, "-version"], capture_output=True, check=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{QEMU} cannot start: {exc}"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (needed for the director VM's tap)"
    return None


def start(lab_ns: str, argv: list[str], run_dir: Path) -> subprocess.Popen:
    log = open(run_dir / "qemu.log", "w")  # noqa: SIM115 (owned by the child from here on)
    with log:
        # `ip netns exec` execs qemu, so the PID is qemu's; its tap is created in lab_ns.
        return subprocess.Popen(
            ["ip", "netns", "exec", lab_ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def serial_tail(run_dir: Path, lines: int = 40) -> str:
    text = ""
    for name in ("qemu.log", "serial.log"):
        path = run_dir / name
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            text += f"--- {name}\n" + "\n".join(tail) + "\n"
    return text


def wait_console_ready(proc: subprocess.Popen, run_dir: Path, timeout: float) -> None:
    """Wait for stage 2 to report that sshd was started."""
    serial = run_dir / "serial.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if READY_MARKER in text:
            return
        if proc.poll() is not None or any(f in text for f in _FATAL):
            raise RuntimeError(f"director VM failed to boot\n{serial_tail(run_dir)}")
        time.sleep(0.2)
    raise RuntimeError(f"director VM not ready after {timeout:.0f}s\n{serial_tail(run_dir)}")
