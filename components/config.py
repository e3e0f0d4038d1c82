"""Stack config -> frozen dataclasses: the program's user interface, validated before any resource.

Pure: no Pulumi types, no I/O. The virtual service rules (addresses, ports, schedulers, weights,
host key) are the provider's own validators from providers/model.py, so `pulumi preview` and the
provider's `check` can never disagree; this module adds the structure around them and reports
every problem under its stack config path, e.g. `ipvs-ingress:vips[0].ports[1].port`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from providers import model
from providers.model import Director, InvalidSpec, Problem, RealServer, VirtualServiceSpec

PROJECT = "ipvs-ingress"
GUARD_KEYS = ("guardExternalIPs", "externalIPPool")
KEYS = ("app", "vips", "realServers", "director", *GUARD_KEYS)
# Read as raw text (Config.get, not get_object): `yes` is then "not a boolean", not bad JSON.
TEXT_KEYS = ("guardExternalIPs",)
SECRET_KEY = "sshPrivateKey"

APP_DEFAULTS: dict[str, Any] = {
    "name": "nginx",
    "namespace": "default",
    "image": "nginx:1.27.3",
    "replicas": 2,
    "containerPort": 80,
}
VIP_DEFAULTS: dict[str, Any] = {"scheduler": "wlc", "persistenceSeconds": 0}
DIRECTOR_KEYS = ("host", "port", "user", "hostKey", "interface", "bootstrap", "proxyCommand")

# Service names are DNS-1035 labels, namespaces DNS-1123 labels (Kubernetes API validation).
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class App:
    name: str
    namespace: str
    image: str
    replicas: int
    container_port: int


@dataclass(frozen=True)
class VipPort:
    port: int
    protocol: str

    @property
    def name(self) -> str:
        """The Service port name, e.g. "tcp-80"."""
        return f"{self.protocol}-{self.port}"


@dataclass(frozen=True)
class Vip:
    address: str
    ports: tuple[VipPort, ...]
    scheduler: str
    persistence_seconds: int


@dataclass(frozen=True)
class StackConfig:
    app: App
    vips: tuple[Vip, ...]
    real_servers: tuple[RealServer, ...]
    director: Director
    bootstrap: bool
    # One per (VIP, port, protocol), exactly as the VirtualService resource receives it.
    virtual_services: tuple[VirtualServiceSpec, ...]
    guard: Guard = dataclasses.field(default_factory=lambda: Guard(True, ()))

    @property
    def service_ports(self) -> tuple[VipPort, ...]:
        """The distinct (port, protocol) pairs over all VIPs, in config order."""
        return tuple(dict.fromkeys(p for vip in self.vips for p in vip.ports))

    @property
    def urls(self) -> tuple[str, ...]:
        """One per VIP and port: http:// for TCP (the app is nginx), udp:// otherwise."""
        return tuple(
            f"{'http' if p.protocol == 'tcp' else p.protocol}://"
            f"{f'[{vip.address}]' if ':' in vip.address else vip.address}:{p.port}"
            for vip in self.vips
            for p in vip.ports
        )

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(sorted({vip.scheduler for vip in self.vips}))


class ConfigError(InvalidSpec):
    """All problems found, on one line: the first few in full, then a count."""

    SHOWN = 3

    def __init__(self, problems: list[Problem]):
        super().__init__(problems)
        more = len(problems) - self.SHOWN
        text = "; ".join(str(p) for p in problems[: self.SHOWN])
        self.args = (text + (f" (and {more} more)" if more > 0 else ""),)


def path(key: str) -> str:
    return f"{PROJECT}:{key}"


def load(values: Mapping[str, Any]) -> StackConfig:
    """Parse the four structured keys (bare names: app, vips, realServers, director).

    Raises ConfigError naming every bad field with its path, the value and the fix.
    """
    report = _Report()
    app = _app(report, values.get("app"))
    vips = _vips(report, values.get("vips"))
    real_servers = values.get("realServers")
    if isinstance(real_servers, list):
        for k, item in enumerate(real_servers):
            if isinstance(item, Mapping):
                report.object(f"{path('realServers')}[{k}]", item, ("address", "weight"), "")
    director, bootstrap = _director(report, values.get("director"))
    specs = _virtual_services(report, vips, real_servers, values.get("director"))
    guard = _guard(report, values, [raw.get("address") for raw, _ in vips])
    if report.problems:
        raise ConfigError(list(dict.fromkeys(report.problems)))  # shared fields repeat per VIP
    return StackConfig(
        app=app,
        vips=tuple(
            Vip(
                group[0].vip,
                tuple(VipPort(s.port, s.protocol) for s in group),
                group[0].scheduler,
                group[0].persistence_seconds,
            )
            for group in specs
        ),  # fmt: skip
        real_servers=tuple(dict.fromkeys(r for g in specs for s in g for r in s.real_servers)),
        director=director,
        bootstrap=bootstrap,
        virtual_services=tuple(s for group in specs for s in group),
        guard=guard,
    )


def load_stack_file(config: Mapping[str, Any]) -> StackConfig:
    """Parse the `config:` block of a stacks/Pulumi.<stack>.yaml file (namespaced keys)."""
    prefix = f"{PROJECT}:"
    ours = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
    report = _Report()
    report.object(PROJECT, ours, (*KEYS, SECRET_KEY), "")
    if report.problems:
        raise ConfigError(
            [Problem(p.field.replace(".", ":", 1), p.message) for p in report.problems]
        )
    return load(ours)


# --- sections ---------------------------------------------------------------------------------


class _Report:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, field: str, message: str) -> None:
        self.problems.append(Problem(field, message))

    def object(self, name: str, value: Any, known: Sequence[str], shape: str) -> Mapping | None:
        """The mapping at `name`, or None after reporting; unknown keys are reported as typos."""
        if not isinstance(value, Mapping):
            self.add(name, f"{_short(value)} is not an object: give {shape}")
            return None
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"use only {', '.join(known)}"
                self.add(f"{name}.{key}", f"unknown key {key!r}: {fix}")
        return value

    def integer(self, name: str, value: Any, lo: int, hi: int, what: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return value
        self.add(name, f"{_short(value)} is not a valid {what}: use a whole number from {lo} to {hi}")  # fmt: skip
        return lo


def _app(report: _Report, value: Any) -> App:
    name = path("app")
    shape = "{name, namespace, image, replicas, containerPort}"
    raw = report.object(name, {} if value is None else value, list(APP_DEFAULTS), shape)
    merged = {**APP_DEFAULTS, **(raw or {})}
    app_name, namespace, image = merged["name"], merged["namespace"], merged["image"]
    label = "use lowercase letters, digits and '-', at most 63 characters"
    if not isinstance(app_name, str) or not _DNS1035.match(app_name):
        report.add(f"{name}.name", f"{_short(app_name)} is not a Kubernetes Service name: {label}, starting with a letter")  # fmt: skip
    if not isinstance(namespace, str) or not _DNS1123.match(namespace):
        report.add(f"{name}.namespace", f"{_short(namespace)} is not a namespace name: {label}")
    if not _pinned_image(image):
        report.add(f"{name}.image", f"{_short(image)} is not a pinned image: give a tag or digest, e.g. nginx:1.27.3 (not :latest)")  # fmt: skip
    replicas = report.integer(f"{name}.replicas", merged["replicas"], 0, 1000, "replica count")
    port = report.integer(f"{name}.containerPort", merged["containerPort"], 1, 65535, "container port")  # fmt: skip
    return App(app_name, namespace, image, replicas, port)


def _pinned_image(image: Any) -> bool:
    if not isinstance(image, str) or not image or any(ch.isspace() for ch in image):
        return False
    if "@" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith((":", ":latest"))


# A VIP entry and its (index, port entry) pairs, structurally sound; values checked later.
_RawVip = tuple[Mapping, list[tuple[int, Mapping]]]


def _vips(report: _Report, value: Any) -> list[_RawVip]:
    name = path("vips")
    if not isinstance(value, list) or not value:
        report.add(name, f"{_short(value)} is not a list of VIPs: give at least one {{address, ports: [{{port, protocol}}]}}")  # fmt: skip
        return []
    out: list[_RawVip] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        vname = f"{name}[{i}]"
        shape = "{address, ports, scheduler, persistenceSeconds}"
        raw = report.object(vname, item, ("address", "ports", *VIP_DEFAULTS), shape) or {}
        address = _canonical(raw.get("address"))
        if address in seen:
            report.add(f"{vname}.address", f"{raw['address']!r} repeats {name}[{seen[address]}].address: list its ports in one entry")  # fmt: skip
        elif address is not None:
            seen[address] = i
        out.append((raw, _ports(report, vname, raw.get("ports")) if raw else []))
    return out


def _ports(report: _Report, vname: str, value: Any) -> list[tuple[int, Mapping]]:
    if not isinstance(value, list) or not value:
        report.add(f"{vname}.ports", f"{_short(value)} is not a list of ports: give at least one {{port, protocol}}, e.g. [{{port: 80, protocol: tcp}}]")  # fmt: skip
        return []
    out: list[tuple[int, Mapping]] = []
    seen: dict[tuple[Any, str], int] = {}
    for j, item in enumerate(value):
        pname = f"{vname}.ports[{j}]"
        raw = report.object(pname, item, ("port", "protocol"), "{port, protocol}")
        if raw is None:
            continue
        port = raw.get("port")
        # A mistyped port (a list, a map) must reach the port check, not crash on hashing.
        key = (
            port if isinstance(port, int | float | str) else repr(port),
            str(raw.get("protocol", "tcp")).lower(),
        )
        if key in seen:
            report.add(pname, f"{key[1]}/{key[0]} repeats {vname}.ports[{seen[key]}]: list each port once")  # fmt: skip
            continue
        seen[key] = j
        out.append((j, raw))
    return out


def _director(report: _Report, value: Any) -> tuple[Director, bool]:
    name = path("director")
    shape = "{host, hostKey, port, user, interface, bootstrap, proxyCommand}"
    raw = report.object(name, value, DIRECTOR_KEYS, shape)
    if raw is None:
        return Director(host="", host_key=""), False
    director, found = model.check_director(_ssh_fields(raw), prefix=name)
    report.problems.extend(found)
    bootstrap = raw.get("bootstrap", False)
    if not isinstance(bootstrap, bool):
        report.add(f"{name}.bootstrap", f"{_short(bootstrap)} is not a boolean: use true to prepare the director with pulumi-command, false if it is prepared already")  # fmt: skip
        bootstrap = False
    if bootstrap and raw.get("proxyCommand") is not None:
        # pulumi-command's SSH connection can hop through an SSH bastion, not run a command.
        report.add(f"{name}.bootstrap", "true cannot go through director.proxyCommand (pulumi-command has no ProxyCommand): prepare the director by hand as README.md ('Preparing the director') shows and set bootstrap: false")  # fmt: skip
    return director or Director(host="", host_key=""), bootstrap


def _ssh_fields(director: Mapping) -> dict[str, Any]:
    """The director as the VirtualService resource takes it: bootstrap is the program's own."""
    return {k: v for k, v in director.items() if k != "bootstrap"}


def _virtual_services(
    report: _Report, vips: list[_RawVip], real_servers: Any, director: Any
) -> list[list[VirtualServiceSpec]]:
    """Run the provider's own check on each (VIP, port); map its fields to config paths."""
    out: list[list[VirtualServiceSpec]] = []
    used: set[int] = set()
    director = _ssh_fields(director) if isinstance(director, Mapping) else {}
    for i, (vip, ports) in enumerate(vips):
        rs, rs_index = _same_family(real_servers, vip.get("address"))
        if isinstance(real_servers, list) and real_servers and not rs:
            family = _family(vip["address"])
            report.add(f"{path('vips')}[{i}].address", f"{vip['address']!r} has no real server of its address family: add the nodes' IPv{family} addresses to {path('realServers')}")  # fmt: skip
            out.append([])
            continue
        used.update(rs_index)
        group: list[VirtualServiceSpec] = []
        for j, port in ports:
            props = {
                "director": director,
                "vip": vip.get("address"),
                "port": port.get("port"),
                "protocol": port.get("protocol", "tcp"),
                "scheduler": vip.get("scheduler", VIP_DEFAULTS["scheduler"]),
                "persistenceSeconds": vip.get(
                    "persistenceSeconds", VIP_DEFAULTS["persistenceSeconds"]
                ),  # fmt: skip
                "realServers": rs,
            }
            found = model.check_virtual_service(props)
            report.problems.extend(
                Problem(_config_field(p.field, i, j, rs_index), p.message)
                for p in found
                if not p.field.startswith("director")  # reported once by _director
            )
            if not found:
                group.append(model.parse_virtual_service(props)[1])
        out.append(group)
    if vips and isinstance(real_servers, list):
        for k in sorted(set(range(len(real_servers))) - used):
            address = real_servers[k]["address"]
            report.add(f"{path('realServers')}[{k}].address", f"{address!r} is IPv{_family(address)} but no VIP is: remove it or add a VIP of that family")  # fmt: skip
    return out


def _config_field(field: str, i: int, j: int, rs_index: list[int]) -> str:
    """A provider property path ("port", "realServers[1].weight") as a stack config path."""
    vip = f"{path('vips')}[{i}]"
    if field.startswith("realServers["):
        k, rest = field[len("realServers[") :].split("]", 1)
        return f"{path('realServers')}[{rs_index[int(k)]}]{rest}"
    return {
        "vip": f"{vip}.address",
        "port": f"{vip}.ports[{j}].port",
        "protocol": f"{vip}.ports[{j}].protocol",
        "scheduler": f"{vip}.scheduler",
        "persistenceSeconds": f"{vip}.persistenceSeconds",
        "realServers": path("realServers"),
    }.get(field, f"{vip}.{field}")


def _same_family(real_servers: Any, vip: Any) -> tuple[Any, list[int]]:
    """The real servers a VIP forwards to: those of its family (dual-stack nodes list both).

    Entries that are not addresses at all stay in, so the provider's check reports them.
    """
    if not isinstance(real_servers, list):
        return real_servers, []
    family = _family(vip)
    keep = [
        k
        for k, item in enumerate(real_servers)
        if family is None
        or not isinstance(item, Mapping)
        or _family(item.get("address")) in (None, family)
    ]
    return [real_servers[k] for k in keep], keep


def _family(address: Any) -> int | None:
    try:
        return ipaddress.ip_address(address).version if isinstance(address, str) else None
    except ValueError:
        return None


def _canonical(address: Any) -> str | None:
    family = _family(address)
    return str(ipaddress.ip_address(address)) if family else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- the externalIP guard (CVE-2020-8554) ------------------------------------------------------


@dataclass(frozen=True)
class Guard:
    """Whether to deploy the admission policy, and the pool other Services' externalIPs must
    come from (canonical CIDRs; empty: any address that is not one of this stack's VIPs)."""

    enabled: bool
    pool: tuple[str, ...]


def _guard(report: _Report, values: Mapping[str, Any], vips: list[Any]) -> Guard:
    name, pool_name = path("guardExternalIPs"), path("externalIPPool")
    raw = values.get("guardExternalIPs")
    if raw is None or isinstance(raw, bool):
        enabled = raw is not False  # on unless turned off
    elif raw in ("true", "false"):  # the engine hands a boolean over as text
        enabled = raw == "true"
    else:
        report.add(name, f"{_short(raw)} is not a boolean: use true to deny other Services this stack's VIPs as externalIPs (CVE-2020-8554), false to leave Services unguarded")  # fmt: skip
        enabled = False
    pool = _pool(report, pool_name, values.get("externalIPPool"))
    if pool and not enabled:
        report.add(pool_name, f"{_short(list(pool))} is set but {name} is false, so nothing enforces it: remove {pool_name} or set guardExternalIPs: true")  # fmt: skip
    if enabled:
        for i, address in enumerate(vips):
            mapped = _ipv4_mapped(address)
            if mapped is not None:
                report.add(f"{path('vips')}[{i}].address", f"{_short(address)} is an IPv4-mapped IPv6 address, which Kubernetes' ip() and so the externalIP guard refuse: give the IPv4 address {mapped}")  # fmt: skip
    return Guard(enabled, pool)


def _ipv4_mapped(address: Any) -> ipaddress.IPv4Address | None:
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else None
    except ValueError:
        return None  # not an address at all: the VIP check reports it
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None


def _pool(report: _Report, name: str, value: Any) -> tuple[str, ...]:
    """The CIDRs in canonical form, each one that the policy's cidr() (Go netip.ParsePrefix)
    parses: a CIDR it refused would fail every Service with externalIPs in the cluster."""
    if value is None:
        return ()
    if not isinstance(value, list):
        report.add(name, f"{_short(value)} is not a list of CIDRs: give e.g. [198.51.100.0/24, 2001:db8:100::/64], or [] for no pool")  # fmt: skip
        return ()
    pool: dict[str, None] = {}
    for k, item in enumerate(value):
        network, problem = _cidr(item)
        if network is None:
            report.add(f"{name}[{k}]", f"{_short(item)} is not a CIDR: {problem}")
        else:
            pool[network] = None
    return tuple(pool)


def _cidr(value: Any) -> tuple[str | None, str]:
    """(canonical CIDR, "") or (None, what to fix)."""
    fix = "write address/prefix-length, e.g. 198.51.100.0/24 or 2001:db8:100::/64"
    address, _, bits = value.partition("/") if isinstance(value, str) else ("", "", "")
    # ipaddress also takes netmasks (/255.255.255.0) and zones (%eth0); cidr() takes neither.
    if not (bits.isascii() and bits.isdigit()) or "%" in address:
        return None, fix
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None, fix
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.network_address.ipv4_mapped is not None
    ):
        return None, "cidr() refuses IPv4-mapped IPv6 networks: give the IPv4 network"
    if network.network_address != ipaddress.ip_address(address):
        return None, f"it has host bits set: write {network}"
    return str(network), ""
