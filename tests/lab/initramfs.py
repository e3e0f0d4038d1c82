"""The director VM's boot files: a busybox initramfs (stage 1), the stage-2 script and sshd config.

Stage 1 only loads what is needed to mount the host's root read-only over 9p with a tmpfs overlay,
then switches to it; stage 2 runs as PID 1 on that root with the host's own userland (sshd,
python3, ipvsadm, modprobe). Run-specific values travel on the kernel command line as
``lab_<name>=<value>`` so the same artifacts serve every run.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
from pathlib import Path

# Just enough for root over virtio-9p with an overlay; dependencies come from modules.dep.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
READY_MARKER = "IPVS-INGRESS-LAB-READY"

# Shared by both stages: `lab_x=v` on the kernel command line becomes LAB_X=v.
_PARSE_CMDLINE = """\
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        lab_*=*) name=${arg%%=*}; eval "$(echo "$name" | tr a-z A-Z)=\\"\\${arg#*=}\\"" ;;
    esac
done
"""

INIT = f"""#!/bin/busybox sh
# Stage 1: mount the host's root over 9p (read-only) under a tmpfs overlay and switch to it.
/bin/busybox --install -s /bin
mount -t proc proc /proc
{_PARSE_CMDLINE}
for m in $(cat /modules.load); do
    insmod "/modules/$m.ko" || {{ echo "stage1: insmod $m failed"; exit 1; }}
done
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /lower \\
    || {{ echo "stage1: 9p mount failed"; exit 1; }}
mount -t tmpfs -o mode=755 overlay-rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \\
    || {{ echo "stage1: overlay mount failed"; exit 1; }}
umount /proc
# lab_stage2 picks another stage 2 (the systemd lab's); the busybox one by default.
exec switch_root /newroot /bin/sh "${{LAB_STAGE2:-$LAB_CACHE/boot/stage2.sh}}"
"""

# Stage 2's setup, shared by both inits: API filesystems, the VM's view of the lab cache, eth0,
# root's authorized key.
_STAGE2_SETUP = f"""export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
set -eu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=755 tmpfs /run
# /tmp stays the overlay's (writable): the lab cache may live under the host's /tmp.
{_PARSE_CMDLINE}
hostname director
# modprobe needs the unpacked tree; the host itself has no /lib/modules.
mkdir -p /lib/modules
ln -sfn "$LAB_CACHE/kernel/$LAB_KVER/lib/modules/$LAB_KVER" "/lib/modules/$LAB_KVER"
# root's .bashrc runs `pyenv init`, which costs ~10 s per ssh command under TCG.
: > /root/.bashrc
# Pinned pyroute2 (Debian's 0.7 has no IPVS) for the host's /usr/bin/python3.
mkdir -p "$LAB_PYSITE"
echo "$LAB_PYROUTE2" > "$LAB_PYSITE/ipvs-ingress-lab.pth"
modprobe virtio_net
ip link set lo up
ip addr add "$LAB_ADDR" dev eth0
ip link set eth0 up
mkdir -p -m 700 /root/.ssh
cp "$LAB_CACHE/keys/client_ed25519.pub" /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
"""

STAGE2 = f"""#!/bin/sh
# Stage 2, PID 1 of the director VM on the overlay root. Leaves ip_vs and ip_forward alone:
# setting them up is the product's job. Exiting panics the kernel, which stops qemu.
{_STAGE2_SETUP}mkdir -p -m 755 /run/sshd
/usr/sbin/sshd -D -e -f "$LAB_CACHE/boot/sshd_config" &
echo "{READY_MARKER}"
wait
echo "stage2: sshd exited"
"""

# The systemd lab's persistent disk (a raw image on the host, /dev/vda in the VM) and what of it
# the director sees: overlays whose upper layer is on the disk, over the trees that hold the
# product's directories, its command and the units enabled at run time. Everything else of the root is the
# tmpfs overlay, new at each boot. Overlays of the parents, not mounts of the directories
# themselves: the documented uninstall (`rm -rf` of each) must work as on any director.
DISK_MOUNT = "/lab-disk"
STATE_DIR = "/var/lib/ipvs-ingress"  # the desired state (state.json)
INSTALL_DIR = "/usr/local/lib/ipvs-ingress"  # the runtime the provider installs
COMMAND_DIR = "/usr/local/sbin"  # the operators' command, ipvs-ingress
CONFIG_DIR = "/etc/ipvs-ingress"  # the operator's runtime.json
UNITS_DIR = "/etc/systemd/system"
# {name of the overlay (its folder on the disk): the tree it covers}
PERSISTENT_TREES = {
    "lab-etc": "/etc",
    "lab-usr-local": "/usr/local",
    "lab-var-lib": "/var/lib",
}
PERSISTENT_DIRS = (STATE_DIR, INSTALL_DIR, COMMAND_DIR, CONFIG_DIR, UNITS_DIR)
SSHD_UNIT = "lab-sshd.service"
# Host units that would wait (gettys: no udev, 90 s device timeouts), start needlessly or clash
# (the host's own ssh.service: the lab's sshd is SSHD_UNIT). Masked by `systemd.mask=` kernel
# options (see vm.py): no process start per unit in stage 2, and nothing of it on the disk.
MASKED_UNITS = (
    "ssh.service",
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "postgresql.service",
    "postgresql@.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "man-db.timer",
    "fstrim.timer",
    "e2scrub_all.timer",
    # No use in this VM, and each costs a process start under TCG before sshd comes up.
    "modprobe@drm.service",
    "modprobe@dm_mod.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "dev-hugepages.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "systemd-binfmt.service",
    "systemd-sysusers.service",
)

# Before systemd starts: the runtime's unit, sources, state and settings are there at boot.
_PERSISTENT_OVERLAYS = (
    "mkdir -p "
    + " ".join(f"{DISK_MOUNT}/{n}/upper {DISK_MOUNT}/{n}/work" for n in PERSISTENT_TREES)
    + "\n"
    + "".join(
        f"mount -t overlay -o lowerdir={tree},upperdir={DISK_MOUNT}/{n}/upper,"
        f"workdir={DISK_MOUNT}/{n}/work {n} {tree}\n"
        for n, tree in PERSISTENT_TREES.items()
    )
)

STAGE2_SYSTEMD = f"""#!/bin/sh
# Stage 2 of the systemd lab (tests/lab, Lab(init="systemd")): the busybox stage 2's setup, the
# lab's disk, then systemd as PID 1. Every boot passes through stage 1, so this runs on every boot.
step=setup
trap 'echo "stage2: $step failed"' EXIT
{_STAGE2_SETUP}
step="mount the lab disk"
modprobe virtio_blk
modprobe ext4
i=0
while [ ! -b /dev/vda ]; do  # devtmpfs adds the node shortly after the driver binds
    i=$((i + 1))
    [ "$i" -le 100 ]
    sleep 0.1
done
mkdir -p {DISK_MOUNT}
mount -t ext4 /dev/vda {DISK_MOUNT}
{_PERSISTENT_OVERLAYS}# The pyroute2 .pth again: the one written above may be hidden by the disk's layer.
echo "$LAB_PYROUTE2" > "$LAB_PYSITE/ipvs-ingress-lab.pth"

step="prepare systemd"
if [ ! -s {DISK_MOUNT}/machine-id ]; then  # one machine for the life of the disk
    tr -d - < /proc/sys/kernel/random/uuid > {DISK_MOUNT}/machine-id.new
    sync {DISK_MOUNT}/machine-id.new
    mv {DISK_MOUNT}/machine-id.new {DISK_MOUNT}/machine-id
    sync {DISK_MOUNT}
fi
read -r machine_id < {DISK_MOUNT}/machine-id  # shell builtins: each exec costs under TCG
echo "$machine_id" > /etc/machine-id
echo director > /etc/hostname
# The host image is a container: with /.dockerenv systemd runs in container mode (ignores the
# systemd.* kernel options, skips what a VM's PID 1 does).
rm -f /.dockerenv
# Debian's rule empties /tmp at boot: through the overlay that takes minutes and deletes the
# host's /tmp as this VM sees it (the lab cache may live there).
echo 'd /tmp 1777 root root -' > /etc/tmpfiles.d/tmp.conf
units=/run/systemd/system
mkdir -p "$units/multi-user.target.wants"
# Written on every boot by this script, so sshd comes back after any reboot.
cat > "$units/{SSHD_UNIT}" <<UNIT
[Unit]
Description=sshd of the ipvs-ingress director lab (tests/lab)
After=network.target

[Service]
ExecStart=/usr/sbin/sshd -D -e -f $LAB_CACHE/boot/sshd_config
ExecStartPost=/bin/sh -c 'echo {READY_MARKER} > /dev/console'
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755
KillMode=process
Restart=always
RestartSec=1
UNIT
ln -sfn "../{SSHD_UNIT}" "$units/multi-user.target.wants/{SSHD_UNIT}"
trap - EXIT
exec /lib/systemd/systemd
"""


def sshd_config(host_key: Path) -> str:
    return f"""# The lab director's sshd (tests/lab): key authentication only, pinned host key.
Port 22
ListenAddress 0.0.0.0
HostKey {host_key}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
MaxStartups 64:30:128
MaxSessions 64
PidFile /run/sshd.pid
Subsystem sftp internal-sftp
"""


def module_order(modules_dir: Path, wanted: tuple[str, ...] = BOOT_MODULES) -> list[str]:
    """Relative .ko paths of `wanted` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(p).name.split(".ko")[0]: p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    builtin = (modules_dir / "modules.builtin").read_text().split()
    for name in wanted:
        name_variants = {name, name.replace("_", "-")}
        if name in by_name:
            visit(by_name[name])
        elif not any(Path(b).name.split(".ko")[0] in name_variants for b in builtin):
            raise RuntimeError(f"kernel module {name} is neither loadable nor built in")
    return order


class _Cpio:
    """Minimal writer for the newc format (device nodes without needing mknod)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 1

    def add(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.data += b"070701" + b"".join(b"%08X" % f for f in fields)
        self.data += name.encode() + b"\0"
        self._pad()
        self.data += body
        self._pad()

    def _pad(self) -> None:
        self.data += b"\0" * (-len(self.data) % 4)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self.data)


def fingerprint(modules_dir: Path) -> str:
    """Changes whenever the initramfs would: new init script or kernel."""
    return hashlib.sha256(INIT.encode() + str(modules_dir).encode()).hexdigest()[:12]


def build(modules_dir: Path, target: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox (busybox-static) is not installed")
    order = module_order(modules_dir)
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules"):
        cpio.add(d, stat.S_IFDIR | 0o755)
    # The kernel opens /dev/console for init's stdio before anything is mounted.
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, Path(busybox).read_bytes())
    cpio.add("init", stat.S_IFREG | 0o755, INIT.encode())
    names = []
    for rel in order:
        name = Path(rel).name.split(".ko")[0]
        names.append(name)
        cpio.add(f"modules/{name}.ko", stat.S_IFREG | 0o644, (modules_dir / rel).read_bytes())
    cpio.add("modules.load", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode())
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(cpio.finish())
    tmp.rename(target)
