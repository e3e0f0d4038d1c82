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
from providers.model import (
    Director,
    InvalidSpec,
    Problem,
    RealServer,
    VirtualServiceSpec,
    whole_number,
)
from providers.model import _short as _short

PROJECT = "ipvs-ingress"
GUARD_KEYS = ("guardExternalIPs", "externalIPPool")
KEYS = (
    "app", "vips", "realServers", "director", "directors", "vrrp", *GUARD_KEYS, "kubernetes",
    "repair", "health",
)  # fmt: skip
# Read as raw text (Config.get, not get_object): `yes` is then "not a boolean", not bad JSON.
TEXT_KEYS = ("guardExternalIPs", "kubernetes", "repair")
SECRET_KEY = "sshPrivateKey"

APP_DEFAULTS: dict[str, Any] = {
    "name": "nginx",
    "namespace": "default",
    "image": "nginx:1.27.3",
    "replicas": 2,
    "containerPort": 80,
    "externalTrafficPolicy": "Cluster",
}
# kube-proxy's policies for a Service's external traffic (a ClusterIP Service with externalIPs).
TRAFFIC_POLICIES = ("Cluster", "Local")
VIP_DEFAULTS: dict[str, Any] = {"scheduler": "wlc", "persistenceSeconds": 0}
DIRECTOR_KEYS = ("host", "port", "user", "hostKey", "interface", "bootstrap", "proxyCommand")
# ipvs-ingress:directors (issue 10): each a director plus its VRRP priority and its own address
# on the director segment (VRRP's unicast source and peer; by default its host, if an address).
HA_DIRECTOR_KEYS = (*DIRECTOR_KEYS, "priority", "address")
MIN_HA_DIRECTORS = 2
PRIORITY_RANGE = (1, 254)  # VRRP: 255 is the address owner, which never yields the VIPs
# ipvs-ingress:vrrp: the settings every director of the group shares (model.check_vrrp's rules).
VRRP_SETTINGS = ("virtualRouterId", "advertSeconds", "preemptDelaySeconds")

PORT_KEYS = ("port", "protocol", "targetPort")
MAX_REPLICAS = 1000
MAX_MESSAGE = 300  # a ConfigError line never grows past this, however many problems there are

# Service names are DNS-1035 labels, namespaces DNS-1123 labels (Kubernetes API validation).
# Always re.fullmatch: `$` would match before a final newline ('web\n').
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# An image reference (distribution/reference grammar): [registry[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}))?"
)
# A config key that can be shown as a path segment as it is; others are shown as repr.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")


@dataclass(frozen=True)
class App:
    name: str
    namespace: str
    image: str
    replicas: int
    container_port: int
    # Cluster: any node forwards to any pod, masquerading (pods see a node's address); Local:
    # only to its own pods (pods see the client's address, a node without one drops VIP traffic).
    external_traffic_policy: str = "Cluster"


@dataclass(frozen=True)
class VipPort:
    port: int
    protocol: str
    target_port: int  # the container port the Service sends it to (default app.containerPort)

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
class DirectorConfig:
    """One director of the stack. priority and address are set for ipvs-ingress:directors
    (VIPs held by VRRP) and None for the single ipvs-ingress:director (the runtime binds them)."""

    director: Director
    bootstrap: bool
    priority: int | None = None
    address: str | None = None  # canonical IP on the director segment


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
    # False: the director side only (no Deployment, Service or guard; the nodes forward the VIPs).
    kubernetes: bool = True
    # False: the director's runtime restores this stack's services at boot but leaves drift
    # between `pulumi up`s (refresh shows it, up converges); every VirtualService gets it.
    repair: bool = True
    # Per virtual service key: its resolved health check (model.check_health's normalized form,
    # every key filled), the VirtualService input `health`.
    health: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # Every director: ipvs-ingress:directors in config order, or the single director as a
    # one-element tuple. `director` and `bootstrap` above are the first one's and "any".
    directors: tuple[DirectorConfig, ...] = ()
    # ipvs-ingress:vrrp, normalized with its defaults (model.VRRP_DEFAULTS): {virtualRouterId,
    # advertSeconds, preemptDelaySeconds (absent: no preemption)}; empty for one director.
    vrrp_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def vrrp(self) -> bool:
        """Whether the VIPs are held by VRRP between several directors (ipvs-ingress:directors)."""
        return len(self.directors) >= MIN_HA_DIRECTORS

    @property
    def service_ports(self) -> tuple[VipPort, ...]:
        """The distinct (port, protocol) pairs over all VIPs, in config order."""
        return tuple(dict.fromkeys(p for vip in self.vips for p in vip.ports))

    @property
    def urls(self) -> tuple[str, ...]:
        """One per VIP and port, with the scheme of what answers there.

        http:// only where the port reaches app.containerPort over TCP: that is the port nginx
        serves plain HTTP on (and the probes check). Any other port is shown as tcp:// or udp://,
        and nothing claims https, since no TLS is configured.
        """
        return tuple(
            f"{self._scheme(p)}://"
            f"{f'[{vip.address}]' if ':' in vip.address else vip.address}:{p.port}"
            for vip in self.vips
            for p in vip.ports
        )

    def _scheme(self, port: VipPort) -> str:
        http = port.protocol == "tcp" and port.target_port == self.app.container_port
        return "http" if http else port.protocol

    @property
    def container_ports(self) -> tuple[tuple[int, str], ...]:
        """The distinct (targetPort, protocol) pairs, app.containerPort/tcp first."""
        pairs = [(self.app.container_port, "tcp")]
        pairs += [(p.target_port, p.protocol) for p in self.service_ports]
        return tuple(dict.fromkeys(pairs))

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(sorted({vip.scheduler for vip in self.vips}))


class ConfigError(InvalidSpec):
    """All problems found, on one line: the first few in full, then a count."""

    SHOWN = 3

    def __init__(self, problems: list[Problem]):
        super().__init__(problems)
        shown = [str(problems[0])[:MAX_MESSAGE]]
        for p in problems[1 : self.SHOWN]:
            if len("; ".join([*shown, str(p)])) + len(" (and 99 more)") > MAX_MESSAGE:
                break
            shown.append(str(p))
        more = len(problems) - len(shown)
        text = "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")
        if len(text) > MAX_MESSAGE:  # one long problem and others: keep the count, cut the text
            suffix = f" (and {more} more)"
            text = text[: MAX_MESSAGE - len(suffix) - 3] + "..." + suffix
        self.args = (text,)


def path(key: str) -> str:
    return f"{PROJECT}:{key}"


def load(values: Mapping[str, Any]) -> StackConfig:
    """Parse the four structured keys (bare names: app, vips, realServers, director).

    Raises ConfigError naming every bad field with its path, the value and the fix.
    """
    if not isinstance(values, Mapping):
        raise ConfigError([Problem(PROJECT, f"{_short(values)} is not a mapping of config keys: give app, vips, realServers and director")])  # fmt: skip
    report = _Report()
    app = _app(report, values.get("app"))
    vips = _vips(report, values.get("vips"))
    real_servers = values.get("realServers")
    if isinstance(real_servers, list):
        for k, item in enumerate(real_servers):
            if isinstance(item, Mapping):
                report.object(f"{path('realServers')}[{k}]", item, ("address", "weight"), "")
    directors, raw_director = _all_directors(report, values)
    specs = _virtual_services(report, vips, real_servers, raw_director)
    _vrrp_family(report, directors, vips)
    vrrp_settings = _vrrp_settings(report, values.get("vrrp"), directors, values.get("directors"))
    targets = _target_ports(report, vips, app.container_port)
    guard = _guard(report, values)
    kubernetes = _kubernetes(report, values.get("kubernetes"), guard)
    repair = _boolean(report, "repair", values.get("repair"), REPAIR_FIX)
    health = _health(report, values.get("health"), vips, specs)
    if report.problems:
        raise ConfigError(list(dict.fromkeys(report.problems)))  # shared fields repeat per VIP
    return StackConfig(
        app=app,
        vips=tuple(
            Vip(
                group[0].vip,
                tuple(VipPort(s.port, s.protocol, targets[(s.port, s.protocol)]) for s in group),
                group[0].scheduler,
                group[0].persistence_seconds,
            )
            for group in specs
        ),  # fmt: skip
        real_servers=tuple(dict.fromkeys(r for g in specs for s in g for r in s.real_servers)),
        director=directors[0].director,
        bootstrap=any(d.bootstrap for d in directors),
        virtual_services=tuple(s for group in specs for s in group),
        guard=guard,
        kubernetes=kubernetes,
        repair=repair,
        health=health,
        directors=directors,
        vrrp_settings=vrrp_settings,
    )


def load_stack_file(config: Mapping[str, Any]) -> StackConfig:
    """Parse the `config:` block of a stacks/Pulumi.<stack>.yaml file (namespaced keys)."""
    prefix = f"{PROJECT}:"
    if not isinstance(config, Mapping):
        raise ConfigError([Problem("config", f"{_short(config)} is not a mapping: give the stack's settings as {prefix}<key>: <value>")])  # fmt: skip
    ours = {
        k[len(prefix) :]: v
        for k, v in config.items()
        if isinstance(k, str) and k.startswith(prefix)
    }
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
                plain = isinstance(key, str) and _PLAIN_KEY.fullmatch(key)
                close = difflib.get_close_matches(key, list(known), n=1) if plain else []
                fix = f"did you mean {close[0]!r}?" if close else f"use only {', '.join(known)}"
                label = key if plain else _short(key)
                self.add(f"{name}.{label}", f"unknown key {_short(key)}: {fix}")
        return value

    def integer(self, name: str, value: Any, lo: int, hi: int, what: str) -> int:
        # The provider's own rule (model.whole_number): 80.0 is 80, 80.5 and True are not.
        number = whole_number(value, lo, hi)
        if number is not None:
            return number
        self.add(name, f"{_short(value)} is not a valid {what}: use a whole number from {lo} to {hi}")  # fmt: skip
        return lo


def _app(report: _Report, value: Any) -> App:
    name = path("app")
    shape = "{name, namespace, image, replicas, containerPort, externalTrafficPolicy}"
    raw = report.object(name, {} if value is None else value, list(APP_DEFAULTS), shape)
    merged = {**APP_DEFAULTS, **(raw or {})}
    app_name, namespace, image = merged["name"], merged["namespace"], merged["image"]
    label = "use lowercase letters, digits and '-', at most 63 characters"
    if not isinstance(app_name, str) or not _DNS1035.fullmatch(app_name):
        report.add(f"{name}.name", f"{_short(app_name)} is not a Kubernetes Service name: {label}, starting with a letter")  # fmt: skip
    if not isinstance(namespace, str) or not _DNS1123.fullmatch(namespace):
        report.add(f"{name}.namespace", f"{_short(namespace)} is not a namespace name: {label}")
    if not isinstance(image, str) or not _IMAGE.fullmatch(image):
        report.add(f"{name}.image", f"{_short(image)} is not an image reference: give e.g. nginx:1.27.3 or registry.example.net/team/nginx@sha256:<64 hex digits>")  # fmt: skip
    elif not _pinned_image(image):
        report.add(f"{name}.image", f"{_short(image)} is not a pinned image: give a tag or digest, e.g. nginx:1.27.3 (not :latest)")  # fmt: skip
    replicas = report.integer(f"{name}.replicas", merged["replicas"], 0, MAX_REPLICAS, "replica count")  # fmt: skip
    port = report.integer(f"{name}.containerPort", merged["containerPort"], 1, 65535, "container port")  # fmt: skip
    policy = merged["externalTrafficPolicy"]
    if policy not in TRAFFIC_POLICIES:
        report.add(f"{name}.externalTrafficPolicy", f"{_short(policy)} is not a traffic policy: use Cluster (the default: pods see a node's address) or Local (pods see the client's own address; a node without a ready pod drops VIP traffic and is drained)")  # fmt: skip
        policy = "Cluster"
    return App(app_name, namespace, image, replicas, port, policy)


def _pinned_image(image: str) -> bool:
    """A digest (name@sha256:<64 hex>) or a tag other than latest; `image` matches _IMAGE."""
    match = _IMAGE.fullmatch(image)
    if match["digest"]:
        return True
    return match["tag"] is not None and match["tag"] != "latest"


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
        shape = "{address, ports, scheduler, persistenceSeconds, health}"
        raw = report.object(vname, item, ("address", "ports", *VIP_DEFAULTS, "health"), shape)
        if raw is None:
            out.append(({}, []))
            continue
        address = _canonical(raw.get("address"))
        if address in seen:
            report.add(f"{vname}.address", f"{_short(raw['address'])} repeats {name}[{seen[address]}].address: list its ports in one entry")  # fmt: skip
        elif address is not None:
            seen[address] = i
        out.append((raw, _ports(report, vname, raw.get("ports"))))
    return out


def _ports(report: _Report, vname: str, value: Any) -> list[tuple[int, Mapping]]:
    if not isinstance(value, list) or not value:
        report.add(f"{vname}.ports", f"{_short(value)} is not a list of ports: give at least one {{port, protocol}}, e.g. [{{port: 80, protocol: tcp}}]")  # fmt: skip
        return []
    out: list[tuple[int, Mapping]] = []
    seen: dict[str, int] = {}
    for j, item in enumerate(value):
        pname = f"{vname}.ports[{j}]"
        raw = report.object(pname, item, PORT_KEYS, "{port, protocol, targetPort}")
        if raw is None:
            continue
        if "targetPort" in raw:
            report.integer(f"{pname}.targetPort", raw["targetPort"], 1, 65535, "container port")
        # Shown as the checks will read them (80.0 is 80); a mistyped port (a list, a map) must
        # still reach the port check, not crash on hashing or printing.
        port, protocol = raw.get("port"), raw.get("protocol", "tcp")
        number = whole_number(port, 1, 65535)
        shown = str(number) if number is not None else _short(port)
        plain = isinstance(protocol, str) and protocol.isalnum() and len(protocol) <= 8
        key = f"{protocol.lower() if plain else _short(protocol)}/{shown}"
        if key in seen:
            report.add(pname, f"{key} repeats {vname}.ports[{seen[key]}]: list each port once")
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
    return director or Director(host="", host_key=""), _bootstrap(report, name, raw)


def _bootstrap(report: _Report, name: str, raw: Mapping) -> bool:
    bootstrap = raw.get("bootstrap", False)
    if not isinstance(bootstrap, bool):
        report.add(f"{name}.bootstrap", f"{_short(bootstrap)} is not a boolean: use true to prepare the director with pulumi-command, false if it is prepared already")  # fmt: skip
        bootstrap = False
    if bootstrap and raw.get("proxyCommand") is not None:
        # pulumi-command's SSH connection can hop through an SSH bastion, not run a command.
        report.add(f"{name}.bootstrap", "true cannot go through director.proxyCommand (pulumi-command has no ProxyCommand): prepare the director by hand as README.md ('Preparing the director') shows and set bootstrap: false")  # fmt: skip
    return bootstrap


def _ssh_fields(director: Mapping) -> dict[str, Any]:
    """The director as the VirtualService resource takes it: bootstrap, priority and address
    are the program's own."""
    return {k: v for k, v in director.items() if k not in ("bootstrap", "priority", "address")}


# --- several directors, the VIPs held by VRRP (issue 10) ----------------------------------------


def _all_directors(report: _Report, values: Mapping) -> tuple[tuple[DirectorConfig, ...], Any]:
    """Every director, and the raw director the virtual services are checked with."""
    # The engine passes the declared defaults ({} and [], Pulumi.yaml) for keys a stack leaves
    # unset: they mean unset here too.
    single, several = values.get("director"), values.get("directors")
    single = None if single == {} and several not in (None, []) else single
    several = None if several == [] else several
    if several is None:
        director, bootstrap = _director(report, single)
        return (DirectorConfig(director, bootstrap),), single
    if single is not None:
        report.add(path("directors"), f"is set together with {path('director')}: give one director as {path('director')} or two or more as {path('directors')}, not both")  # fmt: skip
        director, bootstrap = _director(report, single)
        return (DirectorConfig(director, bootstrap),), single
    directors = _directors(report, several)
    first = several[0] if isinstance(several, list) and several else None
    return directors, first


def _directors(report: _Report, value: Any) -> tuple[DirectorConfig, ...]:
    name = path("directors")
    shape = "{host, hostKey, priority, address, port, user, interface, bootstrap, proxyCommand}"
    if not isinstance(value, list) or len(value) < MIN_HA_DIRECTORS:
        count = f"has {len(value)} director{'s' * (len(value) != 1)}" if isinstance(value, list) else "is not a list of directors"  # fmt: skip
        report.add(name, f"{_short(value)} {count}: VIP ownership by VRRP needs at least {MIN_HA_DIRECTORS}, each {shape}; for one director use {path('director')}")  # fmt: skip
        return (DirectorConfig(Director(host="", host_key=""), False),)
    out: list[DirectorConfig] = []
    seen: dict[tuple, int] = {}
    priorities: dict[int, int] = {}
    addresses: dict[Any, int] = {}
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        raw = report.object(where, item, HA_DIRECTOR_KEYS, shape)
        if raw is None:
            continue
        director, found = model.check_director(_ssh_fields(raw), prefix=where)
        report.problems.extend(found)
        bootstrap = _bootstrap(report, where, raw)
        priority = _priority(report, where, raw.get("priority"), priorities, i)
        key = (director.host, director.port) if director is not None else None
        if key in seen:  # one problem for a repeated entry, not one per field it repeats
            report.add(f"{where}.host", f"{_short(raw.get('host'))} repeats {name}[{seen[key]}] (same host and port): list each director once")  # fmt: skip
            continue
        address = _vrrp_address(report, where, raw, director, addresses, i)
        if director is not None:
            seen[key] = i
            out.append(DirectorConfig(director, bootstrap, priority, address))
    return tuple(out) or (DirectorConfig(Director(host="", host_key=""), False),)


def _priority(report: _Report, where: str, value: Any, seen: dict[int, int], i: int) -> int | None:
    if value is None:
        report.add(f"{where}.priority", f"not set: give each director a VRRP priority, a whole number from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]} (the highest holds the VIPs first), each different")  # fmt: skip
        return None
    number = whole_number(value, *PRIORITY_RANGE)
    if number is None:
        report.add(f"{where}.priority", f"{_short(value)} is not a VRRP priority: use a whole number from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]} (255 is reserved for an address owner)")  # fmt: skip
        return None
    if number in seen:
        report.add(f"{where}.priority", f"{number} repeats {path('directors')}[{seen[number]}].priority: give each director its own, so the first election does not fall to address order")  # fmt: skip
    seen.setdefault(number, i)
    return number


def _vrrp_address(
    report: _Report, where: str, raw: Mapping, director: Director | None, seen: dict, i: int
) -> str | None:
    """The director's own address on the segment: `address`, or its host if that is one."""
    field, value = f"{where}.address", raw.get("address")
    if value is None:
        if director is None:
            return None  # the host is reported already
        addr = model.plain_ip(director.host)
        if addr is None or addr.is_loopback:
            what = "a DNS name" if addr is None else "a loopback address (a tunnel)"
            report.add(field, f"not set, and host {_short(director.host)} is {what}: give the director's own IP address on the director segment (VRRP's unicast peers are addresses)")  # fmt: skip
            return None
    else:
        addr = model.plain_ip(value)
        reason = model.unservable(addr) if addr is not None else "not an IP address"
        if reason:
            report.add(field, f"{_short(value)} cannot be a director's address ({reason}): give its own unicast IP address on the director segment")  # fmt: skip
            return None
    if seen:
        first = next(iter(seen))
        if addr.version != first.version:
            report.add(field, f"{addr} is IPv{addr.version} but {path('directors')}[{seen[first]}] is IPv{first.version}: VRRP runs in one family, give every director an address of the same family")  # fmt: skip
            return None
    if addr in seen:
        report.add(field, f"{addr} repeats {path('directors')}[{seen[addr]}]'s address: give each director its own")  # fmt: skip
        return None
    seen[addr] = i
    return str(addr)


def _vrrp_family(report: _Report, directors: tuple[DirectorConfig, ...], vips: list) -> None:
    """VRRPv3 announces at least one VIP of its own family (the directors' addresses'), and a
    VIP is never a director's own address (it moves between them)."""
    addresses = {d.address: i for i, d in enumerate(directors) if d.address is not None}
    if len(directors) < MIN_HA_DIRECTORS or not addresses:
        return
    family = ipaddress.ip_address(next(iter(addresses))).version
    canonical = [_canonical(raw.get("address")) for raw, _ports in vips]
    for i, address in enumerate(canonical):
        if address in addresses:
            report.add(f"{path('vips')}[{i}].address", f"{address} is {path('directors')}[{addresses[address]}]'s own address: a VIP moves between directors, give another")  # fmt: skip
    known = [a for a in canonical if a is not None]
    if known and all(_family(a) != family for a in known):
        report.add(path("vips"), f"has no IPv{family} VIP, but the directors' addresses are IPv{family}: VRRPv3 announces at least one VIP of its own family; add one, or give the directors IPv{6 if family == 4 else 4} addresses")  # fmt: skip


def _vrrp_settings(
    report: _Report, raw: Any, directors: tuple[DirectorConfig, ...], several: Any
) -> dict[str, Any]:
    """ipvs-ingress:vrrp, checked by the provider's own rules (model.check_vrrp) so preview and
    check agree; {} (the engine's default for the unset key) is unset."""
    name = path("vrrp")
    raw = None if raw == {} else raw
    if raw is not None and several in (None, []):
        report.add(name, f"{_short(raw)} is set but {path('directors')} is not: VRRP settings apply to two or more directors; remove {name} or list the directors under {path('directors')}")  # fmt: skip
        return {}
    if len(directors) < MIN_HA_DIRECTORS:
        return {}
    shape = f"{{{', '.join(VRRP_SETTINGS)}}}, each optional"
    given = report.object(name, {} if raw is None else raw, VRRP_SETTINGS, shape)
    if given is None:
        return {}
    settings = {k: v for k, v in given.items() if k in VRRP_SETTINGS}
    # The director's own part is filled in with a placeholder that passes: only the shared
    # settings' problems are this key's (the directors' are reported under ipvs-ingress:directors).
    probe = {**settings, "priority": 100, "address": "192.0.2.1", "peers": ["192.0.2.2"]}
    normalized, problems = model.check_vrrp(probe, None, prefix=name)
    fields = tuple(f"{name}.{k}" for k in VRRP_SETTINGS)
    report.problems.extend(p for p in problems if p.field in fields)
    if normalized is None:
        return {}
    return {k: normalized[k] for k in VRRP_SETTINGS if k in normalized}


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
            report.add(f"{path('vips')}[{i}].address", f"{_short(vip['address'])} has no real server of its address family: add the nodes' IPv{family} addresses to {path('realServers')}")  # fmt: skip
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
            item = real_servers[k]
            address = item.get("address") if isinstance(item, Mapping) else item
            report.add(f"{path('realServers')}[{k}].address", f"{_short(address)} is IPv{_family(address)} but no VIP is: remove it or add a VIP of that family")  # fmt: skip
    return out


def _target_ports(report: _Report, vips: list[_RawVip], default: int) -> dict[tuple[int, str], int]:
    """(port, protocol) -> the container port it targets; one Service serves every VIP, so a
    port that several VIPs list must target the same container port on each."""
    out: dict[tuple[int, str], int] = {}
    first: dict[tuple[int, str], str] = {}
    for i, (_vip, ports) in enumerate(vips):
        for j, raw in ports:
            port = whole_number(raw.get("port"), 1, 65535)
            protocol = raw.get("protocol", "tcp")
            target = whole_number(raw.get("targetPort", default), 1, 65535)
            if port is None or target is None or not isinstance(protocol, str):
                continue  # reported by the port checks
            key, where = (port, protocol.lower()), f"{path('vips')}[{i}].ports[{j}]"
            if key in out and out[key] != target:
                report.add(f"{where}.targetPort", f"{target} differs from {first[key]}.targetPort ({out[key]}): the one Service sends {key[1]}/{port} to one container port, give both the same")  # fmt: skip
                continue
            out.setdefault(key, target)
            first.setdefault(key, where)
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


# --- the externalIP guard (CVE-2020-8554) ------------------------------------------------------


@dataclass(frozen=True)
class Guard:
    """Whether to deploy the admission policy, and the pool other Services' externalIPs must
    come from (canonical CIDRs; empty: any address that is not one of this stack's VIPs)."""

    enabled: bool
    pool: tuple[str, ...]


def _guard(report: _Report, values: Mapping[str, Any]) -> Guard:
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
    return Guard(enabled, pool)


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


# --- the director runtime's repair on or off -----------------------------------------------------

REPAIR_FIX = "use true to have the director's runtime repair out-of-band changes to this stack's services within seconds, false to leave them for pulumi refresh and up"  # fmt: skip


def _boolean(report: _Report, key: str, raw: Any, fix: str, default: bool = True) -> bool:
    """A boolean key, as YAML gives it (true) or as the engine hands it over (the text "true")."""
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    if raw in ("true", "false"):
        return raw == "true"
    report.add(path(key), f"{_short(raw)} is not a boolean: {fix}")
    return default


# --- health checks of the real servers (issue 9) -------------------------------------------------


def _health(
    report: _Report, stack: Any, vips: list[_RawVip], specs: list[list[VirtualServiceSpec]]
) -> dict[str, dict]:
    """Each virtual service's health check: ipvs-ingress:health (the stack's defaults) with its
    VIP's `health` over it key by key, checked and filled by the provider's own rules
    (model.check_health); every problem is named where its value was set."""
    name = path("health")
    if stack is not None and not isinstance(stack, Mapping):
        report.add(name, f"{_short(stack)} is not an object: give {{check, intervalSeconds, timeoutSeconds, rise, fall, http, depoolThreshold, kubeProxyPort}}, each optional")  # fmt: skip
    stack = stack if isinstance(stack, Mapping) else {}
    out: dict[str, dict] = {}
    for i, group in enumerate(specs):
        vname = f"{path('vips')}[{i}].health"
        own = vips[i][0].get("health") if i < len(vips) else None
        if own is not None and not isinstance(own, Mapping):
            report.add(vname, f"{_short(own)} is not an object: give any of the keys of {name} to override them for this VIP")  # fmt: skip
        own = own if isinstance(own, Mapping) else {}
        for spec in group:
            merged = _merged_health(stack, own, spec.protocol)
            resolved, problems = model.check_health(merged, spec.protocol)
            for p in problems:
                top, rest = _health_field(p.field)
                where = vname if top in {model._label(k) for k in own} else name
                report.add(f"{where}{rest}", p.message)
            if resolved is not None:
                out[spec.key] = resolved
    return out


def _merged_health(stack: Mapping, own: Mapping, protocol: str) -> dict:
    """The VIP's keys over the stack's. An `http` GET applies where the check is vip: it is left
    out where the check is the protocol's default kubeProxy (udp), or a VIP's own check other
    than vip overrides the stack's http (given at the same level, it is refused instead)."""
    merged = {**stack, **own}
    check_set = own.get("check") is not None or stack.get("check") is not None
    if merged.get("http") is not None and "http" not in own:  # the stack's http
        if own.get("check") not in (None, "vip"):
            merged.pop("http")
    if not check_set and model.default_check(protocol) != "vip":
        merged.pop("http", None)
    return merged


def _health_field(field: str) -> tuple[str, str]:
    """A model field "health.http.path" as (its top key "http", the rest ".http.path")."""
    rest = field[len("health") :]
    return re.split(r"[.\[]", rest[1:], maxsplit=1)[0], rest


# --- the Kubernetes side on or off -------------------------------------------------------------


def _kubernetes(report: _Report, raw: Any, guard: Guard) -> bool:
    """Whether the program manages the cluster side (Deployment, Service, guard): on unless off."""
    name = path("kubernetes")
    if raw is None or isinstance(raw, bool):
        enabled = raw is not False
    elif raw in ("true", "false"):  # the engine hands a boolean over as text
        enabled = raw == "true"
    else:
        report.add(name, f"{_short(raw)} is not a boolean: use true to manage the app's Deployment and Service on the cluster too, false to manage only the director")  # fmt: skip
        return True
    if guard.pool and guard.enabled and not enabled:
        report.add(path("externalIPPool"), f"{_short(list(guard.pool))} is set but {name} is false, so no guard is deployed to enforce it: remove {path('externalIPPool')} or set {name} true")  # fmt: skip
    return enabled
