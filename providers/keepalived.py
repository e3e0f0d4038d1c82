"""keepalived.conf for a director in HA mode: keepalived owns the VIPs (VRRP), nothing else.

Director side: stdlib and providers.model only (shipped to the director like probe_services.py).
`render` is pure: the same input gives the same bytes (groups, peers and VIPs are sorted), so a
caller compares before it writes and skips the reload when nothing changed. Every value is
checked first (`problems`); nothing reaches a shell, and the file holds only checked tokens.
`config_test` runs `keepalived -t` on a text before it is installed.

Decisions (figures: ../shared/HA-NOTES.md, measured under qemu TCG):
- VRRPv3, `advert_int` 0.1 s by default: a crashed primary was replaced in 353 ms (3 failed
  requests at 20 req/s) against 3.57 s with VRRPv2's whole seconds; no flapping in 8 minutes.
  Takeover is about 3 x advert + (256 - priority) / 256 x advert.
- One vrrp_instance per director set (a `Group`), not per stack: the IPVS sync daemon, the
  runtime and the interface are per director, so all VIPs of a set share one fate; one
  election means the VIPs and the connection sync never split between directors. A director
  in several sets gets one instance per set (each its own VRID).
- keepalived's rules: every address of `virtual_ipaddress` is of the instance's family (that of
  unicast_src_ip) and VRRPv3 needs at least one; adverts list them (at most 255, fewer per MTU)
  and a backup drops an advert whose list differs from its own (vrrp.c vrrp_check_packet), so
  two directors briefly on different VIP lists would both become master. So the instance
  advertises one VIP (the anchor: the lowest of its family) and every other VIP, of either
  family, is in `virtual_ipaddress_excluded`: added, removed and announced (GARP/NA) with the
  anchor, never compared. `vrrp_skip_check_adv_addr` also covers a change of the anchor under
  an established master. IPv4 VIPs are /32, IPv6 /128 (keepalived adds them nodad, deprecated).
- Preemption: `nopreempt` by default. Both directors hold the same table, so taking the VIPs
  back buys nothing and costs a second handover that can drop flows whose state has not yet
  been synced back to the returning director (keepalived#237, #1966). `preempt_delay` is the
  option for a preferred director, long enough for the sync to catch up.
- `state BACKUP` everywhere: nopreempt and preempt_delay work only so; the first election is
  by priority (3-4 adverts after start).
- Connection sync is not keepalived's: the runtime runs both IPVS sync daemons (master and
  backup, as `ipvsadm --start-daemon`) on every director, always. keepalived's
  `lvs_sync_daemon` runs only the role of the VRRP state, for one instance, and stops with
  keepalived, so a restart or a split brain loses sync; both roles everywhere survived a crash
  and a failback in the lab (HA-NOTES), as keepalived's maintainers advise (keepalived#1076).
- Gratuitous ARP/NA: 5 on takeover and 5 again 5 s later (`vrrp_garp_master_delay/repeat`),
  refreshed every `garp_refresh` s (60: a client that missed a takeover is re-pointed within a
  minute). `vrrp_higher_prio_send_advert`: after a split brain heals, the master that yields
  sends an advert, so the one that stays re-announces its VIPs (garp_lower_prio_*).
- Authentication: none exists in VRRPv3 (RFC 5798 removed it; keepalived refuses
  `authentication` with version 3). What protects the election: unicast adverts to the listed
  peers only; `vrrp_check_unicast_src` drops adverts from any other source; `unicast_ttl 255`
  with `min_ttl 255` on every peer drops any advert that crossed a router (RFC 5082, as RFC
  5798 requires TTL 255 for multicast); the rest is the director segment's own trust (an
  on-link attacker can forge adverts: keep the segment to the directors and nodes).

Tracking the runtime (no scripts: nothing is executed, so no `enable_script_security` is
needed; it is set anyway, so a script added by hand must be safe to run as root):
- Readiness, `track_file` READY_FILE with `weight 0 reverse`. The contract for the runtime:
  write "1\\n" once a pass found (or made) the kernel equal to its record, with the sync
  daemons running; "0\\n" when it cannot; atomically (a temporary file in the same folder,
  renamed over it). keepalived reads the file on every change (inotify). With `reverse`, only
  a non-zero number is ready: a missing, deleted, empty or unreadable file, or anything that
  is not a number, reads as 0 and puts the instance in FAULT (it leaves the VIPs; as master
  it first sends a priority 0 advert, so the peer takes over within a skew time). keepalived
  itself creates the file as "0" if it is missing at its start (`init_file 0`, never
  overwriting). The folder (READY_DIR) must exist before keepalived starts, or keepalived
  drops the tracker ("directory does not exist - removing"): /etc/tmpfiles.d (TMPFILES) or
  the keepalived unit creates it.
- Liveness, `vrrp_track_process` on the runtime's exact command line (`weight 0`: FAULT when
  no such process runs). A dead runtime cannot write the file, so its last "1" would stay:
  the process tracker catches the death at once (the kernel's process events, no polling),
  however it died. `terminate_delay` (runtime_grace, default 0) would let a restart pass
  without a handover. A runtime that hangs is left to systemd's watchdog, which kills it.
  The runtime passes its own /proc/self/cmdline as `runtime_command`, so the match is exact.
  The kernel's process events reach only the initial network namespace: keepalived run in
  another one logs "Failed to set/clear process event listen" and stays in FAULT (seen with
  2.2.7), so it runs in the director's own namespace, as the lab drill does
  (tests/lab/test_ha_lab.py: killing the runtime moved the VIP, 0-1 failed).
- keepalived 2.2.7 `-t` spins forever on some broken files (a track_file reference to an
  undefined tracker): `config_test` runs it with a timeout.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from providers import model
from providers.model import Problem, _short, plain_ip, unservable, whole_number

READY_DIR = "/run/ipvs-ingress"
READY_FILE = f"{READY_DIR}/vrrp-ready"
TMPFILES = f"d {READY_DIR} 0755 root root -\n"  # /etc/tmpfiles.d/ipvs-ingress.conf
RUNTIME_COMMAND = ("/usr/bin/python3", "-m", "providers.runtime", "run")
KEEPALIVED = "/usr/sbin/keepalived"
TEST_TIMEOUT = 10.0  # seconds; `keepalived -t` takes ~15 ms on a good file

DEFAULT_ADVERT = 0.1  # seconds, HA-NOTES: 353 ms failover, no flapping
DEFAULT_GARP_REFRESH = 60  # seconds
GARP_REPEAT = 5  # keepalived's defaults, written out: 5 on takeover, 5 again after 5 s
GARP_DELAY = 5
PRIORITY_RANGE = (1, 254)  # 255 is the address owner: never preempted, refuses nopreempt
VRID_RANGE = (1, 255)
ADVERT_CENTIS = (1, 4095)  # VRRPv3: 12 bits of 10 ms
PREEMPT_DELAY_MAX = 1000  # seconds, keepalived's range
GRACE_MAX_CENTIS = 6000  # runtime_grace up to 60 s
GARP_REFRESH_MAX = 86400
# router_id and tracker names: one keepalived word, no comment (#, !) or expansion ($, @) chars.
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A path or an argument of the runtime's command line, inside "..." in the file.
_ARG = re.compile(r"[A-Za-z0-9/._=:,+%-]{1,200}")
_PATH = re.compile(r"/[A-Za-z0-9/._-]{1,200}")
MAX_COMMAND_WORDS = 16
INSTANCE = "ipvs_ingress_{vrid}"
READY_TRACKER = "ipvs_ingress_ready"
RUNTIME_TRACKER = "ipvs_ingress_runtime"


@dataclass(frozen=True)
class Director:
    """This director, as VRRP sees it."""

    name: str  # router_id, e.g. the host name
    address: str  # its own address on the director segment: unicast_src_ip
    interface: str  # the NIC on that segment: adverts go out here
    priority: int  # 1..254, higher wins the first election


@dataclass(frozen=True)
class Vip:
    address: str
    interface: str  # where it is bound while this director is master


@dataclass(frozen=True)
class Group:
    """One VRRP virtual router: the VIPs a set of directors holds together."""

    virtual_router_id: int
    peers: tuple[str, ...]  # the other directors' addresses on the segment
    vips: tuple[Vip, ...]


@dataclass(frozen=True)
class Settings:
    advert: float = DEFAULT_ADVERT  # seconds, 0.01..40.95 in 10 ms steps
    preempt_delay: int | None = None  # None: nopreempt; else seconds 0..1000
    garp_refresh: int = DEFAULT_GARP_REFRESH  # seconds, 0: never refreshed
    ready_file: str = READY_FILE
    runtime_command: tuple[str, ...] = RUNTIME_COMMAND
    runtime_grace: float = 0.0  # seconds a dead runtime is tolerated (terminate_delay)


class InvalidConfig(model.InvalidSpec):
    """One or more problems, each naming the field, the value and the fix."""


# --- checks -------------------------------------------------------------------------------------


def problems(this: Director, groups: Sequence[Group], settings: Settings) -> list[Problem]:
    """Every problem of the input, [] if `render` can write it."""
    out: list[Problem] = []
    add = lambda field, message: out.append(Problem(field, message))  # noqa: E731
    if not isinstance(this.name, str) or not _WORD.fullmatch(this.name):
        add("director.name", f"{_short(this.name)} is not a router_id: use letters, digits, '_', '.' and '-', at most 64")  # fmt: skip
    own = _address(add, "director.address", this.address, "director address")
    _interface(add, "director.interface", this.interface)
    if whole_number(this.priority, *PRIORITY_RANGE) is None:
        add("director.priority", f"{_short(this.priority)} is not a VRRP priority: use a whole number from 1 to 254 (255 is the address owner, never used)")  # fmt: skip
    if not groups:
        add("groups", "[] holds no VRRP group: give at least one with its VIPs and peers")
    vrids: dict[int, int] = {}
    vips: dict[str, str] = {}
    for i, group in enumerate(groups):
        _group(add, f"groups[{i}]", group, own, vrids, vips, i)
    _settings(add, settings)
    return out


def _group(add, name, group: Group, own, vrids: dict, vips: dict, index: int) -> None:
    vrid = whole_number(group.virtual_router_id, *VRID_RANGE)
    if vrid is None:
        add(f"{name}.virtualRouterId", f"{_short(group.virtual_router_id)} is not a VRID: use a whole number from 1 to 255, the same on every director of the set")  # fmt: skip
    elif vrid in vrids:
        add(f"{name}.virtualRouterId", f"{vrid} repeats groups[{vrids[vrid]}]: give each set of directors its own VRID")  # fmt: skip
    else:
        vrids[vrid] = index
    if not group.peers:
        add(f"{name}.peers", "[] names no peer: VRRP needs the other directors' addresses")
    seen: set = set()
    for j, peer in enumerate(group.peers):
        addr = _address(add, f"{name}.peers[{j}]", peer, "peer address")
        if addr is None:
            continue
        if own is not None and addr.version != own.version:
            add(f"{name}.peers[{j}]", f"{_short(peer)} is IPv{addr.version} but the director's address is IPv{own.version}: give every director an address of one family")  # fmt: skip
        elif addr == own:
            add(f"{name}.peers[{j}]", f"{_short(peer)} is this director's own address: list only the other directors")  # fmt: skip
        elif addr in seen:
            add(f"{name}.peers[{j}]", f"{_short(peer)} is listed twice: list each peer once")
        seen.add(addr)
    family = own.version if own is not None else None
    anchors = 0
    for j, vip in enumerate(group.vips):
        where = f"{name}.vips[{j}]"
        addr = _address(add, f"{where}.address", vip.address, "VIP")
        _interface(add, f"{where}.interface", vip.interface)
        if addr is None:
            continue
        if addr == own or addr in seen:
            add(f"{where}.address", f"{_short(vip.address)} is a director's own address: a VIP moves between directors, give another address")  # fmt: skip
        elif str(addr) in vips:
            add(f"{where}.address", f"{_short(vip.address)} repeats {vips[str(addr)]}: list each VIP in one group, once")  # fmt: skip
        vips.setdefault(str(addr), f"{where}.address")
        anchors += addr.version == family
    if not group.vips:
        add(f"{name}.vips", "[] holds no VIP: give at least one")
    elif family is not None and not anchors:
        add(f"{name}.vips", f"has no IPv{family} VIP: VRRPv3 needs one VIP of the family of the directors' addresses (IPv{family}); give the directors addresses of the VIPs' family")  # fmt: skip


def _settings(add, s: Settings) -> None:
    if _centis(s.advert, *ADVERT_CENTIS) is None:
        add("settings.advert", f"{_short(s.advert)} is not a VRRPv3 advert interval: use seconds from 0.01 to 40.95 in steps of 0.01, e.g. 0.1")  # fmt: skip
    if s.preempt_delay is not None and whole_number(s.preempt_delay, 0, PREEMPT_DELAY_MAX) is None:
        add("settings.preemptDelay", f"{_short(s.preempt_delay)} is not a preempt delay: use whole seconds from 0 to 1000, or none for no preemption")  # fmt: skip
    if whole_number(s.garp_refresh, 0, GARP_REFRESH_MAX) is None:
        add("settings.garpRefresh", f"{_short(s.garp_refresh)} is not a refresh interval: use whole seconds from 0 (never) to 86400")  # fmt: skip
    path = s.ready_file
    if not isinstance(path, str) or not _PATH.fullmatch(path) or "/../" in path + "/":
        add("settings.readyFile", f"{_short(path)} is not a plain absolute path: use letters, digits, '/', '.', '_' and '-', e.g. {READY_FILE}")  # fmt: skip
    elif path.endswith("/") or "//" in path:
        add("settings.readyFile", f"{_short(path)} names no file: give e.g. {READY_FILE}")
    command = s.runtime_command
    if (
        not isinstance(command, tuple)
        or not 1 <= len(command) <= MAX_COMMAND_WORDS
        or not all(isinstance(w, str) and _ARG.fullmatch(w) for w in command)
        or not command[0].startswith("/")
    ):
        add("settings.runtimeCommand", f"{_short(command)} is not the runtime's command line: give its words, the program's absolute path first, e.g. {RUNTIME_COMMAND}")  # fmt: skip
    if _centis(s.runtime_grace, 0, GRACE_MAX_CENTIS) is None:
        add("settings.runtimeGrace", f"{_short(s.runtime_grace)} is not a grace period: use seconds from 0 to 60 in steps of 0.01")  # fmt: skip


def _address(add, field: str, value: object, what: str):
    addr = plain_ip(value)
    if addr is None:
        add(field, f"{_short(value)} is not an IP address: give the {what} as IPv4 or IPv6, no zone")  # fmt: skip
        return None
    reason = unservable(addr)
    if reason:
        add(field, f"{_short(value)} cannot be a {what} ({reason}): use a unicast address")
        return None
    return addr


def _interface(add, field: str, value: object) -> None:
    if not isinstance(value, str) or not model._IFNAME.fullmatch(value) or value in (".", ".."):
        add(field, f"{_short(value)} is not a network interface name: use the director's NIC on the segment, e.g. eth0")  # fmt: skip


def _centis(value: object, lo: int, hi: int) -> int | None:
    """Seconds as a whole number of 10 ms in lo..hi, or None (0.1 -> 10; 0.105 -> None)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not (value == value and abs(value) < 1e6):  # nan, inf
        return None
    centis = round(value * 100)
    if abs(value * 100 - centis) > 1e-6:
        return None
    return centis if lo <= centis <= hi else None


# --- rendering ----------------------------------------------------------------------------------


def render(this: Director, groups: Sequence[Group], settings: Settings = Settings()) -> str:
    """keepalived.conf text for `this` director; raises InvalidConfig naming every problem."""
    found = problems(this, groups, settings)
    if found:
        raise InvalidConfig(found)
    lines = [
        "# Generated by ipvs-ingress (providers/keepalived.py); changes here are overwritten.",
        "# keepalived holds the VIPs only: the IPVS table and its sync daemons are the runtime's.",
        "",
        *_global(this, settings),
        "",
        *_trackers(settings),
    ]
    for group in sorted(groups, key=lambda g: int(g.virtual_router_id)):
        lines += ["", *_instance(this, group, settings)]
    return "\n".join(lines) + "\n"


def _global(this: Director, s: Settings) -> list[str]:
    return [
        "global_defs {",
        f"    router_id {this.name}",
        "    vrrp_version 3",
        "    enable_script_security",
        "    vrrp_check_unicast_src",
        "    vrrp_skip_check_adv_addr",
        f"    vrrp_garp_master_delay {GARP_DELAY}",
        f"    vrrp_garp_master_repeat {GARP_REPEAT}",
        f"    vrrp_garp_master_refresh {int(s.garp_refresh)}",
        "    vrrp_garp_master_refresh_repeat 1",
        "    vrrp_higher_prio_send_advert true",
        "}",
    ]


def _trackers(s: Settings) -> list[str]:
    process = " ".join(f'"{word}"' for word in s.runtime_command)
    grace = _centis(s.runtime_grace, 0, GRACE_MAX_CENTIS)
    return [
        f"track_file {READY_TRACKER} {{",
        f'    file "{s.ready_file}"',
        "    weight 0 reverse",
        "    init_file 0",
        "}",
        "",
        f"vrrp_track_process {RUNTIME_TRACKER} {{",
        f"    process {process}",
        "    weight 0",
        "    quorum 1",
        *([f"    terminate_delay {_seconds(grace)}"] if grace else []),
        "}",
    ]


def _instance(this: Director, group: Group, s: Settings) -> list[str]:
    own = ipaddress.ip_address(this.address)
    vrid = int(group.virtual_router_id)
    peers = sorted({ipaddress.ip_address(p) for p in group.peers})
    vips = sorted(
        {(ipaddress.ip_address(v.address), v.interface) for v in group.vips},
        key=lambda item: (item[0].version != own.version, item[0].version, item[0], item[1]),
    )
    anchor, rest = vips[0], vips[1:]
    preempt = (
        ["    nopreempt"]
        if s.preempt_delay is None
        else [f"    preempt_delay {int(s.preempt_delay)}"]
    )
    return [
        f"vrrp_instance {INSTANCE.format(vrid=vrid)} {{",
        "    state BACKUP",
        f"    interface {this.interface}",
        f"    virtual_router_id {vrid}",
        f"    priority {int(this.priority)}",
        f"    advert_int {_seconds(_centis(s.advert, *ADVERT_CENTIS))}",
        *preempt,
        "    unicast_ttl 255",
        f"    unicast_src_ip {own}",
        "    unicast_peer {",
        *(f"        {peer} min_ttl 255" for peer in peers),
        "    }",
        "    virtual_ipaddress {",
        f"        {_vip(*anchor)}",
        "    }",
        *(
            ["    virtual_ipaddress_excluded {", *(f"        {_vip(*v)}" for v in rest), "    }"]
            if rest
            else []
        ),
        "    track_file {",
        f"        {READY_TRACKER}",
        "    }",
        "    track_process {",
        f"        {RUNTIME_TRACKER}",
        "    }",
        "}",
    ]


def _vip(address, interface: str) -> str:
    return f"{address}/{address.max_prefixlen} dev {interface}"


def _seconds(centis: int) -> str:
    return f"{centis // 100}.{centis % 100:02d}"


# --- keepalived's own check -----------------------------------------------------------------------


def config_test(
    text: str, keepalived: str = KEEPALIVED, timeout: float = TEST_TIMEOUT
) -> str | None:
    """None if `keepalived -t` accepts `text` without a single message, else what it said.

    keepalived 2.2.7 exits 0 only when it reported nothing (a warning is exit 5 too), 4 for a
    missing file or interface; `-e` makes a missing included file an error. The interfaces
    named must exist where this runs (the director itself)."""
    with tempfile.NamedTemporaryFile("w", prefix="keepalived-", suffix=".conf") as f:
        f.write(text)
        f.flush()
        os.fchmod(f.fileno(), 0o600)
        try:
            done = subprocess.run(
                [keepalived, "-t", "-e", "-f", f.name],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"keepalived -t did not finish within {timeout:g} s"
        except OSError as err:
            return f"keepalived -t could not run: {err.strerror or err}"
    said = " | ".join(
        line.replace(f.name, "<file>")
        for line in (done.stderr + done.stdout).splitlines()
        if line.strip()
    )
    if done.returncode == 0 and not said:
        return None
    return f"exit {done.returncode}: {said[:400]}" if said else f"exit {done.returncode}"
