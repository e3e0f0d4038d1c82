#!/bin/sh
# Installs the apt packages the director lab (tests/lab) needs. Idempotent: a no-op when all
# are present, so CI and tests/lab/provision.py may call it on every run.
set -eu

PKGS="qemu-system-x86 kmod iptables tcpdump openssh-server ipvsadm keepalived busybox-static cpio socat \
iproute2 procps python3 python3-venv systemd e2fsprogs"

missing=""
for pkg in $PKGS; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "lab-deps: missing packages:$missing (run as root to install)" >&2
    exit 1
fi

# openssh-server would start an sshd on the host itself; the lab only runs sshd inside its VM.
# A temporary policy-rc.d forbids service starts while installing (only if none exists).
guard=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$guard"
    chmod 755 "$guard"
    trap 'rm -f "$guard"' EXIT INT TERM
fi

echo "lab-deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -qq --no-install-recommends $missing >/dev/null
# keepalived's package enables its unit; on the host it must not run (the lab's directors run
# their own from the shared root with -f), so leave it disabled wherever systemctl can say so.
case " $missing " in
*" keepalived "*) systemctl disable keepalived.service >/dev/null 2>&1 || true ;;
esac
