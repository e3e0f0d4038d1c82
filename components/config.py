"""Stack config -> frozen dataclasses: the program's user interface, validated before any resource.

Pure: no Pulumi types, no I/O. The virtual service rules (addresses, ports, schedulers, weights,
host key) are the provider's own validators from providers/model.py, so `pulumi preview` and the
provider's `check` can never disagree; this module adds the structure around them and reports
every problem under its stack config path, e.g. `ipvs-ingress:vips[0].ports[1].port`.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from providers import model
from providers.model import Director, InvalidSpec, Problem, RealServer, VirtualServiceSpec

PROJECT = "ipvs-ingress"
KEYS = ("app", "vips", "realServers", "director")
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
    problems: list[Problem] = []
    app = _app(values.get("app"), problems)
    raw_vips = _vips(values.get("vips"), problems)
    raw_rs = values.get("realServers")
    if isinstance(raw_rs, list):
        for k, item in enumerate(raw_rs):
            if isinstance(item, Mapping):
                _object(f"{path('realServers')}[{k}]", item, ("address", "weight"), problems, "")
    director, bootstrap = _director(values.get("director"), problems)
    specs = _virtual_services(raw_vips, raw_rs, values.get("director"), problems)
    problems = list(dict.fromkeys(problems))  # one VIP's checks repeat shared fields
    if problems:
        raise ConfigError(problems)
    vips = tuple(
        Vip(
            address=specs[i][0].vip,
            ports=tuple(VipPort(s.port, s.protocol) for s in specs[i]),
            scheduler=specs[i][0].scheduler,
            persistence_seconds=specs[i][0].persistence_seconds,
        )
        for i in range(len(raw_vips))
    )
    real_servers = tuple(
        dict.fromkeys(rs for group in specs for s in group for rs in s.real_servers)
    )
    return StackConfig(
        app=app,
        vips=vips,
        real_servers=real_servers,
        director=director,
        bootstrap=bootstrap,
        virtual_services=tuple(s for group in specs for s in group),
    )


def load_stack_file(config: Mapping[str, Any]) -> StackConfig:
    """Parse the `config:` block of a stacks/Pulumi.<stack>.yaml file (namespaced keys)."""
    prefix = f"{PROJECT}:"
    ours = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
    unknown = [k for k in ours if k not in (*KEYS, SECRET_KEY)]
    if unknown:
        raise ConfigError([_unknown_key(path(k), k, (*KEYS, SECRET_KEY)) for k in unknown])
    return load(ours)


# --- sections ---------------------------------------------------------------------------------


def _object(name: str, value: Any, known: Sequence[str], problems: list[Problem], shape: str):
    """The mapping at `name`, or None after reporting; unknown keys are reported as typos."""
    if not isinstance(value, Mapping):
        problems.append(Problem(name, f"{_short(value)} is not an object: give {shape}"))
        return None
    for key in value:
        if key not in known:
            problems.append(_unknown_key(f"{name}.{key}", key, known))
    return value


def _unknown_key(name: str, key: Any, known: Sequence[str]) -> Problem:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    fix = f"did you mean {close[0]!r}?" if close else f"use only {', '.join(known)}"
    return Problem(name, f"unknown key {key!r}: {fix}")


def _app(value: Any, problems: list[Problem]) -> App:
    name = path("app")
    raw = _object(
        name,
        {} if value is None else value,
        list(APP_DEFAULTS),
        problems,
        "{name, namespace, image, replicas, containerPort}",
    )  # noqa: E501
    merged = {**APP_DEFAULTS, **(raw or {})}
    app_name, namespace, image = merged["name"], merged["namespace"], merged["image"]
    if not isinstance(app_name, str) or not _DNS1035.match(app_name):
        problems.append(
            Problem(
                f"{name}.name",
                f"{_short(app_name)} is not a Kubernetes Service name: use lowercase letters, digits and '-', starting with a letter, at most 63 characters",
            )
        )  # noqa: E501
    if not isinstance(namespace, str) or not _DNS1123.match(namespace):
        problems.append(
            Problem(
                f"{name}.namespace",
                f"{_short(namespace)} is not a namespace name: use lowercase letters, digits and '-', at most 63 characters",
            )
        )  # noqa: E501
    if not _pinned_image(image):
        problems.append(
            Problem(
                f"{name}.image",
                f"{_short(image)} is not a pinned image: give a tag or digest, e.g. nginx:1.27.3 (not :latest)",
            )
        )  # noqa: E501
    replicas = _integer(f"{name}.replicas", merged["replicas"], 0, 1000, "replica count", problems)
    port = _integer(
        f"{name}.containerPort", merged["containerPort"], 1, 65535, "container port", problems
    )  # noqa: E501
    return App(app_name, namespace, image, replicas, port)


def _pinned_image(image: Any) -> bool:
    if not isinstance(image, str) or not image or any(ch.isspace() for ch in image):
        return False
    if "@" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith((":", ":latest"))


def _integer(name: str, value: Any, lo: int, hi: int, what: str, problems: list[Problem]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        return value
    problems.append(
        Problem(
            name, f"{_short(value)} is not a valid {what}: use a whole number from {lo} to {hi}"
        )
    )  # noqa: E501
    return lo


def _vips(value: Any, problems: list[Problem]) -> list[tuple[Mapping, list[Mapping]]]:
    """Each VIP entry with its port entries; structural checks and duplicates only."""
    name = path("vips")
    if not isinstance(value, list) or not value:
        problems.append(
            Problem(
                name,
                f"{_short(value)} is not a list of VIPs: give at least one {{address, ports: [{{port, protocol}}]}}",
            )
        )  # noqa: E501
        return []
    out: list[tuple[Mapping, list[Mapping]]] = []
    seen_vip: dict[str, int] = {}
    for i, item in enumerate(value):
        vname = f"{name}[{i}]"
        raw = _object(
            vname,
            item,
            ("address", "ports", *VIP_DEFAULTS),
            problems,
            "{address, ports, scheduler, persistenceSeconds}",
        )  # noqa: E501
        if raw is None:
            out.append(({}, []))
            continue
        canonical = _canonical(raw.get("address"))
        if canonical in seen_vip:
            j = seen_vip[canonical]
            problems.append(
                Problem(
                    f"{vname}.address",
                    f"{raw.get('address')!r} repeats {name}[{j}].address: list its ports in one entry",
                )
            )  # noqa: E501
        elif canonical is not None:
            seen_vip[canonical] = i
        ports = raw.get("ports")
        if not isinstance(ports, list) or not ports:
            problems.append(
                Problem(
                    f"{vname}.ports",
                    f"{_short(ports)} is not a list of ports: give at least one {{port, protocol}}, e.g. [{{port: 80, protocol: tcp}}]",
                )
            )  # noqa: E501
            out.append((raw, []))
            continue
        entries: list[Mapping] = []
        seen_port: dict[tuple[Any, Any], int] = {}
        for j, port in enumerate(ports):
            pname = f"{vname}.ports[{j}]"
            praw = _object(pname, port, ("port", "protocol"), problems, "{port, protocol}")
            if praw is None:
                continue
            key = (praw.get("port"), str(praw.get("protocol", "tcp")).lower())
            if key in seen_port:
                problems.append(
                    Problem(
                        pname,
                        f"{key[1]}/{key[0]} repeats {vname}.ports[{seen_port[key]}]: list each port once",
                    )
                )  # noqa: E501
                continue
            seen_port[key] = j
            entries.append({**praw, "_index": j})
        out.append((raw, entries))
    return out


def _director(value: Any, problems: list[Problem]) -> tuple[Director, bool]:
    name = path("director")
    shape = "{host, hostKey, port, user, interface, bootstrap, proxyCommand}"
    raw = _object(name, value, DIRECTOR_KEYS, problems, shape)
    if raw is None:
        return Director(host="", host_key=""), False
    director, found = model.check_director(
        {k: v for k, v in raw.items() if k != "bootstrap"}, prefix=name
    )  # noqa: E501
    problems.extend(found)
    bootstrap = raw.get("bootstrap", False)
    if not isinstance(bootstrap, bool):
        problems.append(
            Problem(
                f"{name}.bootstrap",
                f"{_short(bootstrap)} is not a boolean: use true to prepare the director with pulumi-command, false if it is prepared already",
            )
        )  # noqa: E501
        bootstrap = False
    if bootstrap and raw.get("proxyCommand") is not None:
        # pulumi-command's SSH connection can only hop through an SSH bastion, not run a command.
        problems.append(
            Problem(
                f"{name}.bootstrap",
                "true cannot go through director.proxyCommand (pulumi-command has no ProxyCommand): prepare the director by hand as docs/program.md shows and set bootstrap: false",
            )
        )  # noqa: E501
    return director or Director(host="", host_key=""), bootstrap


def _virtual_services(
    vips: list[tuple[Mapping, list[Mapping]]],
    raw_rs: Any,
    raw_director: Any,
    problems: list[Problem],
) -> list[list[VirtualServiceSpec]]:
    """Run the provider's own check on each (VIP, port); map its fields to config paths."""
    out: list[list[VirtualServiceSpec]] = []
    used: set[int] = set()
    director = (
        {k: v for k, v in raw_director.items() if k != "bootstrap"}
        if isinstance(raw_director, Mapping)
        else {}
    )  # noqa: E501
    for i, (vip, ports) in enumerate(vips):
        rs, rs_index = _same_family(raw_rs, vip.get("address"))
        if isinstance(raw_rs, list) and raw_rs and not rs:
            problems.append(
                Problem(
                    f"{path('vips')}[{i}].address",
                    f"{vip.get('address')!r} has no real server of its address family: add the nodes' IPv{_family(vip.get('address'))} addresses to {path('realServers')}",
                )
            )  # noqa: E501
            out.append([])
            continue
        used.update(rs_index)
        group: list[VirtualServiceSpec] = []
        for port in ports:
            props = {
                "director": director,
                "vip": vip.get("address"),
                "port": port.get("port"),
                "protocol": port.get("protocol", "tcp"),
                "scheduler": vip.get("scheduler", VIP_DEFAULTS["scheduler"]),
                "persistenceSeconds": vip.get(
                    "persistenceSeconds", VIP_DEFAULTS["persistenceSeconds"]
                ),  # noqa: E501
                "realServers": rs,
            }
            found = model.check_virtual_service(props)
            problems.extend(
                Problem(_config_field(p.field, i, port["_index"], rs_index), p.message)
                for p in found
                if not p.field.startswith("director")  # reported once by _director
            )
            if not found:
                group.append(model.parse_virtual_service(props)[1])
        out.append(group)
    if vips and isinstance(raw_rs, list):
        problems.extend(
            Problem(
                f"{path('realServers')}[{k}].address",
                f"{raw_rs[k]['address']!r} is IPv{_family(raw_rs[k]['address'])} but no VIP is: remove it or add a VIP of that family",
            )  # noqa: E501
            for k in range(len(raw_rs))
            if k not in used
        )
    return out


def _config_field(field: str, i: int, j: int, rs_index: list[int]) -> str:
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


def _same_family(raw_rs: Any, vip: Any) -> tuple[Any, list[int]]:
    """The real servers a VIP forwards to: those of its family (dual-stack nodes list both).

    Entries that are not addresses at all stay in, so the provider's check reports them.
    """
    family = _family(vip)
    if not isinstance(raw_rs, list) or family is None:
        return raw_rs, list(range(len(raw_rs))) if isinstance(raw_rs, list) else []
    keep = [
        k
        for k, item in enumerate(raw_rs)
        if not isinstance(item, Mapping) or _family(item.get("address")) in (None, family)
    ]
    return [raw_rs[k] for k in keep], keep


def _family(address: Any) -> int | None:
    try:
        return ipaddress.ip_address(address).version if isinstance(address, str) else None
    except ValueError:
        return None


def _canonical(address: Any) -> str | None:
    try:
        return str(ipaddress.ip_address(address)) if isinstance(address, str) else None
    except ValueError:
        return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
