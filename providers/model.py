"""The pure core: virtual service model, validation and the desired-vs-live plan.

Stdlib only. This module is also shipped to the director and runs inside the runtime, so the
plan that the runtime applies is computed by exactly this code (no second implementation).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
import shlex
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Schedulers of the mainline kernel (net/netfilter/ipvs/ip_vs_*.c).
SCHEDULERS = (
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
)  # fmt: skip
PROTOCOLS = ("tcp", "udp")
MAX_WEIGHT = 65535
# Host key algorithms paramiko can verify.
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
)

# Input properties whose change means a different kernel object or director: replace.
REPLACE_KEYS = ("director.host", "director.port", "vip", "port", "protocol")
INPUT_KEYS = (
    "director",
    "vip",
    "port",
    "protocol",
    "scheduler",
    "persistenceSeconds",
    "realServers",
    "owner",
    "repair",
    "health",
    "vrrp",
)
# The stack that declares a virtual service: "<project>/<stack>".
_OWNER = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}\Z")


@dataclass(frozen=True)
class Problem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidSpec(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")


@dataclass(frozen=True)
class RealServer:
    address: str
    weight: int = 1


@dataclass(frozen=True)
class Director:
    host: str
    host_key: str
    port: int = 22
    user: str = "root"
    interface: str = "eth0"
    proxy_command: str | None = None

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class VirtualServiceSpec:
    vip: str
    port: int
    protocol: str
    scheduler: str = "wlc"
    persistence_seconds: int = 0
    real_servers: tuple[RealServer, ...] = ()
    owner: str = ""  # "<project>/<stack>"; "" only in state written before owners existed

    @property
    def key(self) -> str:
        return service_key(self.protocol, self.vip, self.port)


def service_key(protocol: str, vip: str, port: int) -> str:
    host = f"[{vip}]" if ":" in vip else vip
    return f"{protocol}/{host}:{port}"


# --- validation -------------------------------------------------------------------------------

SHOWN = 40  # at most this many characters of a bad value are echoed in a message
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # RFC 1122 "this network": names no host


def _never_unknown(_value: object) -> bool:
    return False


def whole_number(value: object, lo: int, hi: int) -> int | None:
    """`value` as an int in lo..hi, or None. The one number rule of the program and the provider:
    gRPC delivers every number as a float, so 80.0 is 80; 80.5, inf, nan and bools are not.
    Python ints are compared as they are, so 10**400 is simply out of range (float() of it raises).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if lo <= value <= hi else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value) if lo <= value <= hi else None
    return None


def _blank(ch: str) -> bool:
    return ch.isspace() or not ch.isprintable()


def plain_ip(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address with no IPv6 zone id ('%eth0'), or None."""
    if not isinstance(value, str):
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    return None if getattr(addr, "scope_id", None) else addr


def _zoned(value: object) -> bool:
    return isinstance(value, str) and "%" in value and plain_ip(value.split("%", 1)[0]) is not None


def unservable(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why packets to `addr` cannot be load balanced (as a VIP or to a real server), or None."""
    if addr.is_unspecified:
        return "the unspecified address"
    if addr.is_loopback:
        return "a loopback address"
    if addr.is_multicast:
        return "a multicast address"
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if addr.is_link_local:
        return "link-local: it needs a zone and never leaves the segment"
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return "an IPv4-mapped IPv6 address: give the IPv4 address"
    if addr.is_reserved:
        return "in a reserved range"
    if addr.version == 4 and addr in _THIS_NETWORK:
        return "in 0.0.0.0/8, which names no host"
    return None


class _Checker:
    """Collects problems; each accessor returns the normalized value or None."""

    def __init__(self, unknown: Callable[[object], bool]):
        self.problems: list[Problem] = []
        self.unknown = unknown

    def fail(self, name: str, message: str) -> None:
        self.problems.append(Problem(name, message))

    def integer(self, name: str, value: object, lo: int, hi: int, what: str) -> int | None:
        number = whole_number(value, lo, hi)
        if number is None:
            self.fail(
                name, f"{_short(value)} is not a valid {what}: use a whole number from {lo} to {hi}"
            )
        return number

    def address(self, name: str, value: object, what: str):
        addr = plain_ip(value)
        if addr is None:
            if _zoned(value):
                self.fail(name, f"{_short(value)} has a zone id: give the {what} without %<zone>")  # fmt: skip
            else:
                self.fail(name, f"{_short(value)} is not an IP address: give the {what} as IPv4 or IPv6")  # fmt: skip
            return None
        reason = unservable(addr)
        if reason:
            self.fail(name, f"{_short(value)} cannot be a {what} ({reason}): use a unicast address")
            return None
        return addr

    def choice(self, name: str, value: object, allowed: tuple[str, ...]) -> str | None:
        if isinstance(value, str) and value.lower() in allowed:
            return value.lower()
        self.fail(name, f"{_short(value)} is not supported: use one of {', '.join(allowed)}")
        return None


# --- director.host ---

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# A last label that resolvers read as a number (inet_aton: 300, 010, 0x7f): not a DNS name.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")


def canonical_host(value: object) -> str:
    """director.host in its one spelling, so that only a real change is a diff (a replace).

    An IP address in compressed lowercase form (2001:DB8:0::2 -> 2001:db8::2), no zone id; or a
    DNS name in lowercase without the trailing dot of an absolute name with several labels.
    Raises ValueError with the reason and the fix.
    """
    addr = plain_ip(value)
    if addr is not None:
        # The rule for VIPs, except loopback: sshd is reachable there through a tunnel
        # (ssh -L) or when pulumi runs on the director, and this is only the SSH address.
        reason = None if addr.is_loopback else unservable(addr)
        if reason:
            raise ValueError(
                f"cannot be reached over SSH ({reason}): give the director's own address or DNS name"
            )
        return str(addr)
    if _zoned(value):
        raise ValueError("has a zone id: give the address without %<zone>, or a DNS name")
    if not isinstance(value, str) or not _HOSTNAME.fullmatch(value):
        raise ValueError("is not a host name or IP address: set the director's SSH address")
    name = value.lower()
    if name.endswith(".") and name.count(".") > 1:
        name = name[:-1]
    if len(name) > 253 or _NUMERIC_LABEL.fullmatch(name.rstrip(".").rsplit(".", 1)[-1]):
        raise ValueError(
            "is neither an IP address nor a DNS name: write the address in dotted decimal "
            "(e.g. 203.0.113.2) or give the director's DNS name"
        )
    return name


# --- director.hostKey ---

# The public key inside each blob (RFC 4253 6.6, RFC 8709, RFC 5656): what a key must hold.
_ED25519_BYTES = 32
_ECDSA_POINT_BYTES = {"nistp256": 65, "nistp384": 97, "nistp521": 133}  # 0x04 || X || Y
_RSA_MIN_BITS = 1024


def parse_host_key(line: str) -> tuple[str, bytes]:
    """Split an OpenSSH public key line ("type base64 [comment]"); raise ValueError if bad.

    The blob is checked down to its key material (without paramiko, which the director lacks):
    a type string alone, a truncated key or trailing bytes are refused.
    """
    if isinstance(line, str) and any(_blank(ch) and ch not in " \t" for ch in line.strip()):
        raise ValueError("it holds a line break or control character: give one key line")
    parts = line.split() if isinstance(line, str) else []
    if len(parts) >= 3 and parts[0] not in HOST_KEY_TYPES and parts[1] in HOST_KEY_TYPES:
        parts = parts[1:]  # a known_hosts line: drop the host name column
    if len(parts) < 2 or parts[0] not in HOST_KEY_TYPES:
        raise ValueError("expected an OpenSSH public key line like 'ssh-ed25519 AAAAC3Nza...'")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise ValueError("the key data is not valid base64") from None
    fields = _ssh_strings(blob)
    if not fields or fields[0] not in (t.encode() for t in HOST_KEY_TYPES):
        raise ValueError("the key data does not start with a key type")
    embedded = fields[0].decode()
    if embedded != parts[0]:
        raise ValueError(f"the key data is a {embedded!r} key, not {parts[0]!r}")
    if not _holds_key(embedded, fields[1:]):
        raise ValueError(f"the key data holds no complete {embedded} public key")
    return parts[0], blob


def _ssh_strings(blob: bytes) -> list[bytes] | None:
    """The length-prefixed fields of a key blob, or None unless they cover it exactly."""
    fields, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            return None
        (n,) = struct.unpack(">I", blob[at : at + 4])
        if at + 4 + n > len(blob):
            return None
        fields.append(blob[at + 4 : at + 4 + n])
        at += 4 + n
    return fields


def _holds_key(kind: str, fields: list[bytes]) -> bool:
    if kind == "ssh-ed25519":
        return len(fields) == 1 and len(fields[0]) == _ED25519_BYTES
    if kind == "ssh-rsa":  # mpint e, mpint n: positive, n of a usable size
        if len(fields) != 2 or not all(f and f[0] < 0x80 for f in fields):
            return False
        return int.from_bytes(fields[1], "big").bit_length() >= _RSA_MIN_BITS
    curve = kind.rsplit("-", 1)[-1]  # ecdsa-sha2-<curve>: curve name, uncompressed point
    return (
        len(fields) == 2
        and fields[0] == curve.encode()
        and len(fields[1]) == _ECDSA_POINT_BYTES.get(curve)
        and fields[1][:1] == b"\x04"
    )


# --- the director and the virtual service ---

# Interface names as the kernel takes them (dev_valid_name): 1..15 bytes, no '/', ':' or blanks.
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
# Login names as sshd and useradd take them: no blanks, no shell syntax.
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}\$?")


MAX_PROXY_COMMAND = 1024  # a bastion hop is one short line; more is a pasted file or an attack


def proxy_command_problem(value: object) -> str | None:
    """Why director.proxyCommand cannot run (reason and fix), or None.

    Split into words exactly as the transport (and paramiko) will split it, so a command that
    cannot start is refused at preview, not at create after other resources have changed.
    """
    example = "remove it or give e.g. 'ssh -W %h:%p bastion'"
    if not isinstance(value, str) or not value.strip():
        return f"is not a command: {example}"
    if len(value) > MAX_PROXY_COMMAND:
        return f"is {len(value)} characters long: give one command of at most {MAX_PROXY_COMMAND}, e.g. 'ssh -W %h:%p bastion'"  # fmt: skip
    if not value.isprintable():
        return f"holds a line break or control character: {example} on one line"
    try:
        words = shlex.split(value)
    except ValueError as err:  # "No closing quotation", "No escaped character"
        return f"cannot be split into words ({str(err).lower()}): balance its quotes and escapes, e.g. 'ssh -W %h:%p bastion'"  # fmt: skip
    if not words or not words[0]:
        return f"names no program to run: {example}"
    return None


def check_director(
    props: object, unknown=_never_unknown, prefix="director"
) -> tuple[Director | None, list[Problem]]:
    c = _Checker(unknown)
    if not isinstance(props, Mapping):
        c.fail(prefix, f"{_short(props)} is not an object: give {{host, hostKey, port, user, interface}}")  # fmt: skip
        return None, c.problems
    values = {}
    host = props.get("host")
    if not unknown(host):
        try:
            values["host"] = canonical_host(host)
        except ValueError as err:
            c.fail(f"{prefix}.host", f"{_short(host)} {err}")
    key = props.get("hostKey")
    if not unknown(key):
        try:
            kind, blob = parse_host_key(key)
            values["host_key"] = f"{kind} {base64.b64encode(blob).decode()}"
        except ValueError as err:
            c.fail(
                f"{prefix}.hostKey",
                f"{_short(key)} is not a pinned host key ({err}): copy it from 'ssh-keyscan -t ed25519 <director>' or /etc/ssh/ssh_host_ed25519_key.pub",
            )
    port = props.get("port", 22)
    if not unknown(port):
        values["port"] = c.integer(f"{prefix}.port", port, 1, 65535, "SSH port")
    user = props.get("user", "root")
    if not unknown(user):
        if not isinstance(user, str) or not _USER.fullmatch(user):
            c.fail(f"{prefix}.user", f"{_short(user)} is not a user name: set the SSH login user, e.g. root")  # fmt: skip
        values["user"] = user
    iface = props.get("interface", "eth0")
    if not unknown(iface):
        if not isinstance(iface, str) or not _IFNAME.fullmatch(iface) or iface in (".", ".."):
            c.fail(
                f"{prefix}.interface",
                f"{_short(iface)} is not a network interface name: use the director's NIC on the nodes' segment, e.g. eth0",
            )
        values["interface"] = iface
    proxy = props.get("proxyCommand")
    if proxy is not None and not unknown(proxy):
        why = proxy_command_problem(proxy)
        if why:
            c.fail(f"{prefix}.proxyCommand", f"{_short(proxy)} {why}")
        values["proxy_command"] = proxy
    if c.problems or any(unknown(v) for v in props.values()):
        return None, c.problems
    return Director(**values), c.problems


def check_virtual_service(
    props: Mapping, unknown=_never_unknown, need_owner: bool = False
) -> list[Problem]:
    """Problems of `props`; the provider's check needs an owner (the program always sets one),
    the stack config loader checks services before the owner is known."""
    return _parse(props, unknown, need_owner)[1]


def parse_virtual_service(props: Mapping) -> tuple[Director, VirtualServiceSpec]:
    (director, spec), problems = _parse(props, _never_unknown)
    if problems:
        raise InvalidSpec(problems)
    return director, spec


def _parse(
    props: Mapping, unknown, need_owner: bool = False
) -> tuple[tuple[Director | None, VirtualServiceSpec | None], list[Problem]]:
    director, problems = check_director(props.get("director"), unknown)
    c = _Checker(unknown)
    c.problems = problems
    vip = props.get("vip")
    vip_addr = None if unknown(vip) else c.address("vip", vip, "VIP")
    port = props.get("port")
    port = None if unknown(port) else c.integer("port", port, 1, 65535, "port")
    protocol = props.get("protocol", "tcp")
    protocol = None if unknown(protocol) else c.choice("protocol", protocol, PROTOCOLS)
    scheduler = props.get("scheduler", "wlc")
    scheduler = None if unknown(scheduler) else c.choice("scheduler", scheduler, SCHEDULERS)
    persistence = props.get("persistenceSeconds", 0)
    if not unknown(persistence):
        persistence = c.integer(
            "persistenceSeconds",
            persistence,
            0,
            2**31 - 1,
            "persistence timeout in seconds (0 = off)",
        )
    real_servers = _check_real_servers(c, props.get("realServers"), vip_addr)
    owner = props.get("owner", "")
    if need_owner and "owner" not in props:
        c.fail("owner", "missing: give the stack that declares this service as '<project>/<stack>' (the Ingress component sets it)")  # fmt: skip
    elif (
        not unknown(owner)
        and "owner" in props
        and not (isinstance(owner, str) and _OWNER.match(owner))
    ):
        c.fail("owner", f"{_short(owner)} is not a stack: give '<project>/<stack>' (the Ingress component sets it)")  # fmt: skip
    repair = props.get("repair", True)
    if not unknown(repair) and not isinstance(repair, bool):
        c.fail("repair", f"{_short(repair)} is not true or false: set the stack config ipvs-ingress:repair to true or false (the Ingress component passes it on)")  # fmt: skip
    if props.get("health") is not None:  # absent: no health check (state from before it)
        c.problems += check_health(props["health"], protocol, unknown)[1]
    if props.get("vrrp") is not None:  # absent: one director, the runtime binds the VIP
        c.problems += check_vrrp(props["vrrp"], vip_addr, unknown)[1]
    if c.problems or any(unknown(v) for v in props.values()) or director is None:
        return (director, None), c.problems
    spec = VirtualServiceSpec(
        vip=str(vip_addr),
        port=port,
        protocol=protocol,
        scheduler=scheduler,
        persistence_seconds=persistence,
        real_servers=real_servers,
        owner=owner,
    )
    return (director, spec), c.problems


def _check_real_servers(c: _Checker, value: object, vip_addr) -> tuple[RealServer, ...]:
    if c.unknown(value):
        return ()
    if not isinstance(value, list | tuple) or not value:
        c.fail(
            "realServers",
            f"{_short(value)} is not a list of real servers: give at least one {{address, weight}} (the Kubernetes nodes)",
        )
        return ()
    out: list[RealServer] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        name = f"realServers[{i}]"
        if c.unknown(item):
            continue
        if not isinstance(item, Mapping):
            c.fail(name, f"{_short(item)} is not an object: give {{address, weight}}")
            continue
        raw = item.get("address")
        addr = None if c.unknown(raw) else c.address(f"{name}.address", raw, "real server")
        weight = item.get("weight", 1)
        weight = (
            None
            if c.unknown(weight)
            else c.integer(f"{name}.weight", weight, 0, MAX_WEIGHT, "weight")
        )
        if addr is None or weight is None:
            continue
        if vip_addr is not None and addr.version != vip_addr.version:
            c.fail(
                f"{name}.address",
                f"{_short(raw)} is IPv{addr.version} but the VIP is IPv{vip_addr.version}: IPVS forwards within one family, use an IPv{vip_addr.version} node address",
            )
            continue
        if vip_addr is not None and addr == vip_addr:
            c.fail(
                f"{name}.address", f"{_short(raw)} is the VIP itself: list the nodes' own addresses"
            )
            continue
        if str(addr) in seen:
            c.fail(
                f"{name}.address",
                f"{_short(raw)} repeats realServers[{seen[str(addr)]}]: list each node once",
            )
            continue
        seen[str(addr)] = i
        out.append(RealServer(str(addr), weight))
    return tuple(out)


def _short(value: object) -> str:
    """repr(value), cut to SHOWN characters: a 1 MB value must not make a 1 MB message."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int beyond str()'s digit limit, deep nesting
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


# --- resource properties <-> spec -------------------------------------------------------------


def director_props(d: Director) -> dict:
    props = {
        "host": d.host,
        "port": d.port,
        "user": d.user,
        "hostKey": d.host_key,
        "interface": d.interface,
    }
    if d.proxy_command is not None:
        props["proxyCommand"] = d.proxy_command
    return props


def to_props(
    director: Director,
    spec: VirtualServiceSpec,
    repair: bool = True,
    health: dict | None = None,
    vrrp: dict | None = None,
) -> dict:
    """The normalized input properties (what `check` hands back to the engine); `health` only
    when there is one (absent: no health check, as in state from before it); `vrrp` only for a
    director of several (absent: the runtime binds the VIP itself)."""
    props = {"director": director_props(director), **spec_to_dict(spec), "repair": repair}
    if health is not None:
        props["health"] = health
    if vrrp is not None:
        props["vrrp"] = vrrp
    return props


def vrrp_of(props: Mapping) -> dict | None:
    """The `vrrp` input in its normalized form, or None (one director: the runtime binds the VIP).
    Only for props that check_virtual_service passed."""
    raw = props.get("vrrp")
    return None if raw is None else check_vrrp(raw, None)[0]


def repair_of(props: Mapping) -> bool:
    """Whether the director's runtime repairs this service: the `repair` input, checked by
    check_virtual_service; state written before it existed has none, and meant true."""
    return props.get("repair", True) is not False


def health_of(props: Mapping) -> dict | None:
    """The `health` input in its normalized form (every key filled), or None when there is none.
    Only for props that check_virtual_service passed."""
    raw = props.get("health")
    if raw is None:
        return None
    protocol = props.get("protocol", "tcp")
    return check_health(raw, protocol.lower() if isinstance(protocol, str) else None)[0]


# --- health checks of the real servers (issue 9) ---------------------------------------------

HEALTH_CHECKS = ("vip", "kubeProxy", "none")
HEALTH_KEYS = (
    "check", "intervalSeconds", "timeoutSeconds", "rise", "fall", "http", "depoolThreshold",
    "kubeProxyPort",
)  # fmt: skip
HTTP_KEYS = ("path", "expectStatus")
HEALTH_DEFAULTS = {
    "intervalSeconds": 1.0,
    "timeoutSeconds": 0.5,  # or the interval, when that is shorter
    "rise": 2,
    "fall": 2,
    "depoolThreshold": 0.5,
    "kubeProxyPort": 10256,
}
INTERVAL_RANGE = (0.2, 60.0)
MIN_TIMEOUT = 0.1
MAX_HTTP_PATH = 200


def default_check(protocol: str | None) -> str:
    """vip for TCP (the client's own path through IPVS); a TCP connect cannot test UDP."""
    return "kubeProxy" if protocol == "udp" else "vip"


def seconds(value: object, lo: float, hi: float) -> float | None:
    """`value` as a float in lo..hi (an int or a finite float, not a bool), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(value) if lo <= value <= hi else None


def check_health(
    value: object, protocol: str | None, unknown=_never_unknown, prefix: str = "health"
) -> tuple[dict | None, list[Problem]]:
    """The health check settings of one virtual service, normalized: every key of HEALTH_KEYS
    filled with its default except `http`, present only for an HTTP GET. `protocol` None (not
    known yet): the rules that depend on it are left for later. Returns (None, problems) when
    anything is bad or unknown."""
    c = _Checker(unknown)
    if unknown(value):
        return None, []
    if not isinstance(value, Mapping):
        c.fail(prefix, f"{_short(value)} is not an object: give {{check, intervalSeconds, timeoutSeconds, rise, fall, http, depoolThreshold, kubeProxyPort}}, each optional")  # fmt: skip
        return None, c.problems
    for key in value:
        if key not in HEALTH_KEYS:
            c.fail(f"{prefix}.{_label(key)}", f"unknown key {_short(key)}: use only {', '.join(HEALTH_KEYS)}")  # fmt: skip
    value = {k: v for k, v in value.items() if v is not None}  # null: the default (no http)
    out: dict = {}
    check = value.get("check", default_check(protocol))
    if not unknown(check):
        if check not in HEALTH_CHECKS:
            c.fail(f"{prefix}.check", f"{_short(check)} is not a health check: use vip (a connect to the VIP through IPVS), kubeProxy (the node's :10256/healthz) or none")  # fmt: skip
        elif check == "vip" and protocol == "udp":
            c.fail(f"{prefix}.check", "'vip' cannot check a udp port (a TCP connect cannot test a UDP service): use kubeProxy or none, or leave check unset (vip for tcp, kubeProxy for udp)")  # fmt: skip
        out["check"] = check
    _health_numbers(c, value, prefix, out)
    http = value.get("http")
    if http is not None and not unknown(http):
        found = _check_http(c, http, f"{prefix}.http")
        if found is not None and out.get("check", "vip") != "vip":
            c.fail(f"{prefix}.http", f"{_short(http)} is set but check is {out['check']!r}: an HTTP GET needs check vip; remove http, or give http: null where check is kubeProxy or none")  # fmt: skip
        out["http"] = found
    nested = isinstance(http, Mapping) and any(unknown(v) for v in http.values())
    if c.problems or nested or any(unknown(v) for v in value.values()):
        return None, c.problems
    if out.get("http") is None:
        out.pop("http", None)
    return out, []


def _health_numbers(c: _Checker, value: Mapping, prefix: str, out: dict) -> None:
    lo, hi = INTERVAL_RANGE
    interval = value.get("intervalSeconds", HEALTH_DEFAULTS["intervalSeconds"])
    if not c.unknown(interval):
        out["intervalSeconds"] = seconds(interval, lo, hi)
        if out["intervalSeconds"] is None:
            c.fail(f"{prefix}.intervalSeconds", f"{_short(interval)} is not a probe interval: use seconds from {lo:g} to {hi:g}, e.g. 1 or 0.5")  # fmt: skip
    top = out.get("intervalSeconds") or hi
    default_timeout = min(HEALTH_DEFAULTS["timeoutSeconds"], top)
    timeout = value.get("timeoutSeconds", default_timeout)
    if not c.unknown(timeout):
        out["timeoutSeconds"] = seconds(timeout, MIN_TIMEOUT, top)
        if out["timeoutSeconds"] is None:
            c.fail(f"{prefix}.timeoutSeconds", f"{_short(timeout)} is not a probe timeout: use seconds from {MIN_TIMEOUT:g} up to intervalSeconds ({top:g})")  # fmt: skip
    for key, what in (("rise", "successes that restore a drained server"), ("fall", "failures that drain a server")):  # fmt: skip
        raw = value.get(key, HEALTH_DEFAULTS[key])
        if not c.unknown(raw):
            out[key] = c.integer(f"{prefix}.{key}", raw, 1, 10, f"count of {what}")
    raw = value.get("depoolThreshold", HEALTH_DEFAULTS["depoolThreshold"])
    if not c.unknown(raw):
        out["depoolThreshold"] = seconds(raw, 0.0, 1.0)
        if out["depoolThreshold"] is None:
            c.fail(f"{prefix}.depoolThreshold", f"{_short(raw)} is not a fraction: use a number from 0 to 1, the share of real servers kept in service however many fail (e.g. 0.5)")  # fmt: skip
    raw = value.get("kubeProxyPort", HEALTH_DEFAULTS["kubeProxyPort"])
    if not c.unknown(raw):
        out["kubeProxyPort"] = c.integer(f"{prefix}.kubeProxyPort", raw, 1, 65535, "kube-proxy healthz port")  # fmt: skip


def _check_http(c: _Checker, value: object, name: str) -> dict | None:
    if not isinstance(value, Mapping):
        c.fail(name, f"{_short(value)} is not an object: give {{path: /healthz, expectStatus: 200}}, or null for a TCP connect only")  # fmt: skip
        return None
    before = len(c.problems)
    for key in value:
        if key not in HTTP_KEYS:
            c.fail(f"{name}.{_label(key)}", f"unknown key {_short(key)}: use only path, expectStatus")  # fmt: skip
    path = value.get("path", "/")
    if not c.unknown(path) and not (
        isinstance(path, str)
        and path.startswith("/")
        and path.isascii()
        and len(path) <= MAX_HTTP_PATH
        and not any(_blank(ch) for ch in path)
    ):
        c.fail(f"{name}.path", f"{_short(path)} is not a request path: give one starting with '/', at most {MAX_HTTP_PATH} ASCII characters, no spaces or control characters, e.g. /healthz")  # fmt: skip
    status = value.get("expectStatus", 200)
    if not c.unknown(status):
        status = c.integer(f"{name}.expectStatus", status, 100, 599, "HTTP status")
    if len(c.problems) > before or c.unknown(path) or c.unknown(status):
        return None
    return {"path": path, "expectStatus": status}


def _label(key: object) -> str:
    """A key as a field path segment: as it is when plain, else its short repr."""
    plain = isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", key)
    return key if plain else _short(key)


def changed_keys(olds: Mapping, news: Mapping) -> list[str]:
    """Input properties that differ, director fields as 'director.<field>'; both normalized."""
    changed = []
    for key in INPUT_KEYS:
        old, new = olds.get(key), news.get(key)
        if key == "director":
            old, new = old or {}, new or {}
            changed += [
                f"director.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
            ]
        elif key == "realServers":
            if _rs_set(old) != _rs_set(new):
                changed.append(key)
        elif old != new:
            changed.append(key)
    return changed


def _rs_set(value) -> frozenset:
    # Real servers are a set keyed by address: order in config is not a change.
    return frozenset((r.get("address"), r.get("weight", 1)) for r in value or [])


# --- live state and plan ----------------------------------------------------------------------

FORWARDING = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route"}
ROUTE = 3  # IP_VS_CONN_F_DROUTE: direct routing, `ipvsadm -g`


@dataclass(frozen=True)
class LiveDest:
    address: str
    port: int
    weight: int
    forwarding: int = ROUTE


@dataclass(frozen=True)
class LiveService:
    protocol: str
    vip: str
    port: int
    scheduler: str
    persistence_seconds: int
    dests: tuple[LiveDest, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "vip": self.vip,
            "port": self.port,
            "scheduler": self.scheduler,
            "persistenceSeconds": self.persistence_seconds,
            "dests": [
                {
                    "address": d.address,
                    "port": d.port,
                    "weight": d.weight,
                    "forwarding": d.forwarding,
                }
                for d in self.dests
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LiveService:
        return cls(
            protocol=data["protocol"],
            vip=data["vip"],
            port=int(data["port"]),
            scheduler=data["scheduler"],
            persistence_seconds=int(data["persistenceSeconds"]),
            dests=tuple(
                LiveDest(d["address"], int(d["port"]), int(d["weight"]), int(d["forwarding"]))
                for d in data["dests"]
            ),
        )

    @classmethod
    def from_spec(cls, spec: VirtualServiceSpec) -> LiveService:
        dests = tuple(LiveDest(r.address, spec.port, r.weight) for r in spec.real_servers)
        return cls(
            spec.protocol, spec.vip, spec.port, spec.scheduler, spec.persistence_seconds, dests
        )


@dataclass(frozen=True)
class Op:
    """One kernel object change: the unit the agent applies and the benchmark counts."""

    action: str  # add-service | set-service | del-service | add-dest | set-dest | del-dest
    # A destination is (address, port): the same node at another port is another destination.
    address: str | None = None
    port: int | None = None
    weight: int | None = None

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "address": self.address,
            "port": self.port,
            "weight": self.weight,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Op:
        return cls(data["action"], data.get("address"), data.get("port"), data.get("weight"))

    def describe(self, spec: VirtualServiceSpec) -> str:
        svc = spec.key
        if self.action.endswith("service"):
            extra = (
                f" {spec.scheduler} persistent {spec.persistence_seconds}"
                if self.action != "del-service"
                else ""
            )
            return f"{self.action} {svc}{extra}"
        weight = f" weight {self.weight}" if self.weight is not None else ""
        return f"{self.action} {svc} -> {_hostport(self.address, self.port)}{weight} Route"


def plan(live: LiveService | None, desired: VirtualServiceSpec) -> list[Op]:
    """The smallest list of kernel changes that turns `live` into `desired`.

    Destinations are keyed by (address, port): one at another port (added by hand, or left by
    an old VIP port) is removed with its own port, never mistaken for the wanted one. New
    destinations are added before old ones are removed so a swap never leaves the service
    without one.
    """
    port = desired.port
    if live is None:
        return [Op("add-service")] + [
            Op("add-dest", r.address, port, r.weight) for r in desired.real_servers
        ]
    ops: list[Op] = []
    if (live.scheduler, live.persistence_seconds) != (
        desired.scheduler,
        desired.persistence_seconds,
    ):
        ops.append(Op("set-service"))
    current = {(d.address, d.port): d for d in live.dests}
    wanted = {(r.address, port): r for r in desired.real_servers}
    for (addr, _), rs in wanted.items():
        dest = current.get((addr, port))
        if dest is None:
            ops.append(Op("add-dest", addr, port, rs.weight))
        elif (dest.weight, dest.forwarding) != (rs.weight, ROUTE):
            ops.append(Op("set-dest", addr, port, rs.weight))
    ops += [Op("del-dest", addr, p) for (addr, p) in current if (addr, p) not in wanted]
    return ops


def ipvsadm_lines(service: LiveService | VirtualServiceSpec) -> list[str]:
    """The table as ipvsadm-like lines, e.g. 'TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1'."""
    live = service if isinstance(service, LiveService) else LiveService.from_spec(service)
    head = f"{live.protocol.upper()} {_hostport(live.vip, live.port)} {live.scheduler}"
    if live.persistence_seconds:
        head += f" persistent {live.persistence_seconds}"
    dests = sorted(live.dests, key=lambda d: ipaddress.ip_address(d.address))
    if not dests:
        return [head]
    return [
        f"{head} -> {_hostport(d.address, d.port)} {FORWARDING.get(d.forwarding, d.forwarding)} {d.weight}"
        for d in dests
    ]


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def spec_to_dict(spec: VirtualServiceSpec) -> dict:
    owner = {"owner": spec.owner} if spec.owner else {}
    return {
        "vip": spec.vip,
        "port": spec.port,
        "protocol": spec.protocol,
        "scheduler": spec.scheduler,
        "persistenceSeconds": spec.persistence_seconds,
        "realServers": [{"address": r.address, "weight": r.weight} for r in spec.real_servers],
        **owner,
    }


def spec_from_dict(data: Mapping) -> VirtualServiceSpec:
    return VirtualServiceSpec(
        vip=data["vip"],
        port=int(data["port"]),
        protocol=data["protocol"],
        scheduler=data["scheduler"],
        persistence_seconds=int(data["persistenceSeconds"]),
        real_servers=tuple(RealServer(r["address"], int(r["weight"])) for r in data["realServers"]),
        owner=data.get("owner", ""),
    )


# --- VIPs held by VRRP between directors (issue 10) -----------------------------------------------

VRRP_KEYS = (
    "virtualRouterId", "priority", "address", "peers", "advertSeconds", "preemptDelaySeconds",
)  # fmt: skip
VRRP_DEFAULTS = {"virtualRouterId": 51, "advertSeconds": 0.1}  # preemptDelaySeconds unset: none
VRID_RANGE = (1, 255)
VRRP_PRIORITY_RANGE = (1, 254)  # 255 is the address owner: never yields, refuses nopreempt
ADVERT_RANGE = (0.01, 40.95)  # VRRPv3: 12 bits of 10 ms
PREEMPT_DELAY_RANGE = (0, 1000)  # keepalived's range, seconds


def check_vrrp(
    value: object, vip_addr=None, unknown=_never_unknown, prefix: str = "vrrp"
) -> tuple[dict | None, list[Problem]]:
    """This director's part in the VRRP group that holds the VIP, normalized: {virtualRouterId,
    priority, address (its own on the segment), peers (the others', sorted), advertSeconds,
    preemptDelaySeconds (absent: no preemption)}. Returns (None, problems) when anything is bad
    or unknown. keepalived.problems checks the whole group again before rendering."""
    c = _Checker(unknown)
    if unknown(value):
        return None, []
    if not isinstance(value, Mapping):
        c.fail(prefix, f"{_short(value)} is not an object: give {{{', '.join(VRRP_KEYS)}}}")
        return None, c.problems
    for key in value:
        if key not in VRRP_KEYS:
            c.fail(f"{prefix}.{_label(key)}", f"unknown key {_short(key)}: use only {', '.join(VRRP_KEYS)}")  # fmt: skip
    value = {k: v for k, v in value.items() if v is not None}
    out: dict = {}
    vrid = value.get("virtualRouterId", VRRP_DEFAULTS["virtualRouterId"])
    if not unknown(vrid):
        out["virtualRouterId"] = c.integer(f"{prefix}.virtualRouterId", vrid, *VRID_RANGE, "VRRP virtual router id (the same on every director of the group)")  # fmt: skip
    priority = value.get("priority")
    if priority is None:
        c.fail(f"{prefix}.priority", f"missing: give this director's VRRP priority, a whole number from {VRRP_PRIORITY_RANGE[0]} to {VRRP_PRIORITY_RANGE[1]}")  # fmt: skip
    elif not unknown(priority):
        out["priority"] = c.integer(f"{prefix}.priority", priority, *VRRP_PRIORITY_RANGE, "VRRP priority (255 is reserved for an address owner)")  # fmt: skip
    own = None
    if "address" not in value:
        c.fail(f"{prefix}.address", "missing: give this director's own IP address on the director segment")  # fmt: skip
    elif not unknown(value["address"]):
        own = c.address(f"{prefix}.address", value["address"], "director address")
        out["address"] = str(own) if own is not None else None
    peers = value.get("peers")
    if not unknown(peers):
        out["peers"] = _check_peers(c, f"{prefix}.peers", peers, own, vip_addr)
    if own is not None and vip_addr is not None and own == vip_addr:
        c.fail(f"{prefix}.address", f"{_short(value['address'])} is the VIP: a VIP moves between directors, give the director's own address")  # fmt: skip
    advert = value.get("advertSeconds", VRRP_DEFAULTS["advertSeconds"])
    if not unknown(advert):
        centis = whole_number(round(advert * 100), 1, 4095) if _hundredths(advert) else None
        if centis is None:
            c.fail(f"{prefix}.advertSeconds", f"{_short(advert)} is not a VRRPv3 advert interval: use seconds from {ADVERT_RANGE[0]} to {ADVERT_RANGE[1]} in steps of 0.01, e.g. 0.1")  # fmt: skip
        out["advertSeconds"] = centis / 100 if centis is not None else None
    delay = value.get("preemptDelaySeconds")
    if delay is not None and not unknown(delay):
        out["preemptDelaySeconds"] = c.integer(f"{prefix}.preemptDelaySeconds", delay, *PREEMPT_DELAY_RANGE, "preempt delay in seconds (leave it unset for no preemption)")  # fmt: skip
    if c.problems or any(unknown(v) for v in value.values()):
        return None, c.problems
    if isinstance(peers, list) and any(unknown(p) for p in peers):
        return None, []
    return out, []


def _hundredths(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not math.isfinite(value) or abs(value) > 1e6:
        return False
    return abs(value * 100 - round(value * 100)) <= 1e-6


def _check_peers(c: _Checker, name: str, value: object, own, vip_addr) -> list[str] | None:
    if not isinstance(value, list) or not value:
        c.fail(name, f"{_short(value)} names no peer: give the other directors' addresses on the segment, at least one")  # fmt: skip
        return None
    seen: set = set()
    for j, peer in enumerate(value):
        if c.unknown(peer):
            continue
        addr = c.address(f"{name}[{j}]", peer, "peer address")
        if addr is None:
            continue
        if own is not None and addr.version != own.version:
            c.fail(f"{name}[{j}]", f"{_short(peer)} is IPv{addr.version} but this director's address is IPv{own.version}: VRRP runs in one family, give every director an address of the same family")  # fmt: skip
        elif addr == own:
            c.fail(f"{name}[{j}]", f"{_short(peer)} is this director's own address: list only the other directors")  # fmt: skip
        elif addr == vip_addr:
            c.fail(f"{name}[{j}]", f"{_short(peer)} is the VIP: list the other directors' own addresses")  # fmt: skip
        elif addr in seen:
            c.fail(f"{name}[{j}]", f"{_short(peer)} is listed twice: list each peer once")
        seen.add(addr)
    return [str(a) for a in sorted(seen, key=lambda a: (a.version, int(a)))]
