"""Cached, idempotent provisioning of the director lab's artifacts.

Everything lives under ``$IPVS_INGRESS_LAB_CACHE`` (default ``~/.cache/ipvs-ingress/lab``).
The director VM boots the host's own root over 9p, so each artifact only has to be visible on
the host: a Debian kernel with ip_vs (unpacked, never installed into /boot), its ELF vmlinux,
a busybox initramfs, pinned pyroute2 in a plain folder, and the SSH keys. Each step builds into
a temporary path and renames it into place, so an interrupted run never leaves a half artifact
that a later run would trust; a file lock serialises concurrent runs.

Run ``python -m tests.lab.provision`` to provision by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.lab import initramfs

PYROUTE2 = "pyroute2==0.9.7"
REPO = Path(__file__).resolve().parents[2]
LAB_DEPS = REPO / ".ci" / "lab-deps.sh"
# Debian's interpreter: the VM runs the host's /usr/bin/python3 over 9p.
VM_PYTHON = Path("/usr/bin/python3")


@dataclass(frozen=True)
class Artifacts:
    cache: Path
    kernel_version: str
    kernel_tree: Path  # unpacked linux-image package; modules under lib/modules/<version>
    vmlinux: Path
    initrd: Path
    stage2: Path
    stage2_systemd: Path  # stage 2 of Lab(init="systemd")
    sshd_config: Path
    pyroute2_dir: Path
    vm_site_packages: str  # where the VM's python3 reads .pth files
    client_key: Path
    host_key: Path
    elapsed: float  # seconds this provisioning call took

    @property
    def modules_dir(self) -> Path:
        return self.kernel_tree / "lib" / "modules" / self.kernel_version


def cache_dir() -> Path:
    raw = os.environ.get("IPVS_INGRESS_LAB_CACHE", "~/.cache/ipvs-ingress/lab")
    path = Path(raw).expanduser().resolve()
    # The path travels on the kernel command line and into shell scripts.
    if any(c.isspace() for c in str(path)):
        raise ValueError(f"lab cache path must not contain whitespace: {path}")
    # The VM sees the cache through the host's root; these are its own mounts there.
    if path.parts[1:2] in (("run",), ("proc",), ("sys",), ("dev",)):
        raise ValueError(f"lab cache must not live under /{path.parts[1]}: {path}")
    return path


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: list[str], **kw) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def _tmp_sibling(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def ensure_packages() -> None:
    """Install the apt packages on a fresh machine (the script is a no-op when present)."""
    _run(["sh", str(LAB_DEPS)])


def kernel_package() -> str:
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"])
    except RuntimeError:  # no package lists yet (a fresh image)
        _run(["apt-get", "update", "-qq"])
        out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        # Standard flavour only: -cloud-amd64 lacks 9p.
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise RuntimeError(f"no versioned kernel in `apt-cache depends linux-image-amd64`:\n{out}")


def ensure_kernel(cache: Path) -> tuple[str, Path]:
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    tree = cache / "kernel" / version
    if (tree / "lib" / "modules" / version / "modules.dep").exists():
        return version, tree
    work = _tmp_sibling(tree)
    try:
        _run(["apt-get", "download", "-q", package], cwd=work)
        (deb,) = work.glob("*.deb")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        _run(["depmod", "-b", str(root), version])
        root.rename(tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return version, tree


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage: TCG spends ~5 s per boot in the xz decompressor."""
    magic = b"\xfd7zXZ\x00"
    start = bzimage.find(magic)
    while start != -1:
        try:
            elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = bzimage.find(magic, start + 1)
    raise RuntimeError("no xz-compressed ELF payload found in the bzImage")


def ensure_vmlinux(tree: Path, version: str) -> Path:
    target = tree.parent / f"vmlinux-{version}"
    if not target.exists():
        elf = extract_vmlinux((tree / "boot" / f"vmlinuz-{version}").read_bytes())
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(elf)
        tmp.rename(target)
    return target


def ensure_pyroute2(cache: Path) -> Path:
    target = cache / PYROUTE2.replace("==", "-")
    if (target / "pyroute2" / "__init__.py").exists():
        return target
    work = _tmp_sibling(target)
    try:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(work),
                PYROUTE2,
            ]
        )
        # Byte-compile with the VM's interpreter: the VM sees this folder read-only, and
        # compiling pyroute2 on every import under TCG costs seconds.
        _run([str(VM_PYTHON), "-m", "compileall", "-q", str(work)])
        work.chmod(0o755)  # mkdtemp made it private
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def vm_site_packages() -> str:
    # Debian's python3 reads /usr/local/lib/python3.X/dist-packages first.
    code = "import site; print(site.getsitepackages()[0])"
    return _run([str(VM_PYTHON), "-c", code]).strip()


def _keygen(path: Path, comment: str) -> None:
    if path.exists() and path.with_suffix(".pub").exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_suffix(".pub")):
        stale.unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def ensure_keys(cache: Path) -> tuple[Path, Path]:
    keys = cache / "keys"
    client, host = keys / "client_ed25519", keys / "director_host_ed25519"
    _keygen(client, "ipvs-ingress-lab-client")
    _keygen(host, "ipvs-ingress-lab-director")
    return client, host


def _write_if_changed(path: Path, text: str, mode: int = 0o644) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.rename(path)


def provision() -> Artifacts:
    started = time.monotonic()
    cache = cache_dir()
    ensure_packages()
    with cache_lock(cache):
        version, tree = ensure_kernel(cache)
        vmlinux = ensure_vmlinux(tree, version)
        pyroute2_dir = ensure_pyroute2(cache)
        client_key, host_key = ensure_keys(cache)
        boot = cache / "boot"
        boot.mkdir(exist_ok=True)
        modules_dir = tree / "lib" / "modules" / version
        initrd = boot / f"initrd-{version}-{initramfs.fingerprint(modules_dir)}.cpio"
        if not initrd.exists():
            initramfs.build(modules_dir, initrd)
        stage2, sshd_config = boot / "stage2.sh", boot / "sshd_config"
        _write_if_changed(stage2, initramfs.STAGE2, 0o755)
        _write_if_changed(sshd_config, initramfs.sshd_config(host_key))
        # Named by content: labs of other checkouts may share this cache and boot concurrently.
        digest = hashlib.sha256(initramfs.STAGE2_SYSTEMD.encode()).hexdigest()[:12]
        stage2_systemd = boot / f"stage2-systemd-{digest}.sh"
        _write_if_changed(stage2_systemd, initramfs.STAGE2_SYSTEMD, 0o755)
    return Artifacts(
        cache=cache,
        kernel_version=version,
        kernel_tree=tree,
        vmlinux=vmlinux,
        initrd=initrd,
        stage2=stage2,
        stage2_systemd=stage2_systemd,
        sshd_config=sshd_config,
        pyroute2_dir=pyroute2_dir,
        vm_site_packages=vm_site_packages(),
        client_key=client_key,
        host_key=host_key,
        elapsed=time.monotonic() - started,
    )


if __name__ == "__main__":
    art = provision()
    print(f"lab provisioned in {art.elapsed:.1f}s under {art.cache} (kernel {art.kernel_version})")
