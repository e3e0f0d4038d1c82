"""The ingress: one IPVS virtual service per (VIP, port, protocol) on each director.

With ipvs-ingress:directors every director holds the same table (a VirtualService per director
and service, each with that director's part in the VRRP group), and keepalived on the directors
holds each VIP on one of them; the outputs say which.

The VirtualService resources carry no key material: the provider reads `sshPrivateKey` from the
stack config itself, so the key never lands in their inputs, state or outputs. Only the optional
bootstrap commands take the key, as a secret Output.
"""

from __future__ import annotations

import re

import pulumi

from components.bootstrap import DirectorBootstrap
from components.config import DirectorConfig, StackConfig
from providers import model
from providers.virtual_service import VirtualService


def resource_name(spec: model.VirtualServiceSpec) -> str:
    """A stable, readable name, e.g. vs-tcp-203-0-113-201-80 or vs-udp-2001-db8--1-53."""
    vip = spec.vip.replace(".", "-").replace(":", "-")
    return f"vs-{spec.protocol}-{vip}-{spec.port}"


def director_label(director: model.Director) -> str:
    """How outputs name a director: its host, with the port when not 22 (two tunnels on
    127.0.0.1 are two directors)."""
    return director.host if director.port == 22 else f"{director.host}:{director.port}"


def on_director(name: str, director: model.Director) -> str:
    """A resource name of a stack with several directors: `<name>-on-203-0-113-2`."""
    return f"{name}-on-{re.sub(r'[^A-Za-z0-9-]', '-', director_label(director))}"


def vrrp_part(cfg: StackConfig, d: DirectorConfig) -> dict:
    """Director d's part in the VRRP group (the VirtualService input `vrrp`): its priority and
    address, the others' addresses as peers, and the stack's ipvs-ingress:vrrp settings."""
    peers = [o.address for o in cfg.directors if o is not d]
    part = {**cfg.vrrp_settings, "priority": d.priority, "address": d.address, "peers": peers}
    normalized, problems = model.check_vrrp(part)
    if normalized is None:  # components.config.load refuses all of this before
        raise ValueError("; ".join(map(str, problems)))
    return normalized


def service_props(cfg: StackConfig, owner: str) -> list[tuple[str, DirectorConfig, dict]]:
    """(resource name, its director, the VirtualService input props) for every virtual service
    the Ingress declares, in declaration order: director by director, the services in config
    order. Pure: the lab's tests and the Ingress component both build the stack from it.

    One director: the names of old (vs-tcp-203-0-113-201-80) and no `vrrp`. Several: every
    director holds the same table, its resources named `<name>-on-<host>`, each with its own
    part in the VRRP group."""
    out = []
    for d in cfg.directors:
        vrrp = vrrp_part(cfg, d) if cfg.vrrp else None
        for spec in cfg.virtual_services:
            props = model.to_props(d.director, spec, cfg.repair, dict(cfg.health[spec.key]), vrrp)
            name = resource_name(spec)
            out.append(
                (on_director(name, d.director) if cfg.vrrp else name, d, {**props, "owner": owner})
            )
    return out


def aliases(cfg: StackConfig, name: str, d: DirectorConfig) -> list[pulumi.Alias]:
    """The names a resource may have had: the first listed director's were the unsuffixed ones
    (a stack that had it as ipvs-ingress:director), so adding a director after it updates its
    resources instead of replacing them; and back from several directors to that one."""
    if not cfg.vrrp:
        return [pulumi.Alias(name=on_director(name, d.director))]
    if d is cfg.directors[0]:
        return [pulumi.Alias(name=name.removesuffix(on_director("", d.director)))]
    return []


class Ingress(pulumi.ComponentResource):
    bootstraps: list[DirectorBootstrap]
    virtual_services: list[VirtualService]
    ipvsadm: pulumi.Output
    health: pulumi.Output[list[str]]
    vip_holders: pulumi.Output[dict[str, list[str]]] | None

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        service: pulumi.Resource | None,
        private_key: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ipvs-ingress:index:Ingress", name, None, opts)
        # Send VIP traffic only once the Service (its externalIPs on every node) exists. None:
        # the director side only, the nodes' forwarding is managed elsewhere (ipvs-ingress:kubernetes).
        depends_on: list[pulumi.Resource] = [service] if service is not None else []
        if cfg.bootstrap and private_key is None:
            raise ValueError("director.bootstrap needs the SSH private key")
        self.bootstraps = [
            DirectorBootstrap(
                bootstrap_name(cfg, name, d),
                d.director,
                cfg.schedulers,
                private_key,
                keepalived=cfg.vrrp,
                former=_former_bootstrap(cfg, name, d),
                opts=pulumi.ResourceOptions(parent=self, aliases=_bootstrap_aliases(cfg, name, d)),
            )
            for d in cfg.directors
            if d.bootstrap
        ]
        # Ownership on the director is per stack: another stack's services there are never touched.
        # `repair` (ipvs-ingress:repair) and `health` (ipvs-ingress:health with the VIP's own
        # over it) are recorded with each service for the director runtime.
        owner = f"{pulumi.get_project()}/{pulumi.get_stack()}"
        declared = service_props(cfg, owner)
        self.virtual_services = [
            VirtualService(
                vs_name,
                props,
                opts=pulumi.ResourceOptions(
                    parent=self,
                    # A director's services wait for its own bootstrap only.
                    depends_on=depends_on + self._bootstrap_of(d),
                    aliases=aliases(cfg, vs_name, d),
                ),
            )
            for vs_name, d, props in declared
        ]
        labels = [director_label(d.director) for _name, d, _props in declared]
        specs = [spec for _d in cfg.directors for spec in cfg.virtual_services]  # as declared
        tables = pulumi.Output.all(*(vs.ipvsadm for vs in self.virtual_services))
        reports = pulumi.Output.all(*(vs.realServerHealth for vs in self.virtual_services))
        self.vip_holders = None
        if cfg.vrrp:
            self.ipvsadm = tables.apply(lambda t: per_director(labels, t))
            self.health = reports.apply(lambda r: prefixed_health(labels, specs, r))
            held = pulumi.Output.all(*(vs.vipHeld for vs in self.virtual_services))
            self.vip_holders = held.apply(
                lambda h: vip_holders([vip.address for vip in cfg.vips], labels, specs, h)
            )
        else:
            self.ipvsadm = tables.apply(lambda t: [line for table in t for line in table or []])
            self.health = reports.apply(
                lambda r: [
                    line for s, rep in zip(specs, r, strict=True) for line in health_lines(s, rep)
                ]
            )
        outputs = {"virtualServices": self.ipvsadm, "realServerHealth": self.health}
        if self.vip_holders is not None:
            outputs["vipHolders"] = self.vip_holders
        self.register_outputs(outputs)

    def _bootstrap_of(self, d: DirectorConfig) -> list[pulumi.Resource]:
        return [c for b in self.bootstraps if b.director == d.director for c in b.commands]


def bootstrap_name(cfg: StackConfig, name: str, d: DirectorConfig) -> str:
    return on_director(f"{name}-bootstrap", d.director) if cfg.vrrp else f"{name}-bootstrap"


def _former_bootstrap(cfg: StackConfig, name: str, d: DirectorConfig) -> str | None:
    """The first director's bootstrap was `<name>-bootstrap` with one director: its commands
    keep their URNs through the aliases, and back."""
    if not cfg.vrrp:
        return on_director(f"{name}-bootstrap", d.director)
    return f"{name}-bootstrap" if d is cfg.directors[0] else None


def _bootstrap_aliases(cfg: StackConfig, name: str, d: DirectorConfig) -> list[pulumi.Alias]:
    former = _former_bootstrap(cfg, name, d)
    return [pulumi.Alias(name=former)] if former else []


def per_director(labels: list[str], tables: list) -> dict[str, list[str]]:
    """director -> its ipvsadm lines, every director listed (none read back: [])."""
    out: dict[str, list[str]] = {label: [] for label in labels}
    for label, table in zip(labels, tables, strict=True):
        out[label] += table or []
    return out


def prefixed_health(labels: list[str], specs: list, reports: list) -> list[str]:
    """health_lines of every director's services, each line prefixed by its director."""
    return [
        f"{label}: {line}"
        for label, spec, report in zip(labels, specs, reports, strict=True)
        for line in health_lines(spec, report)
    ]


def vip_holders(
    vips: list[str], labels: list[str], specs: list, held: list
) -> dict[str, list[str]]:
    """VIP -> the directors that held it at the last apply or refresh (as each reported; a
    director that did not say is not listed). One entry per VIP; more than one holder is a
    split brain, none a VIP that nobody holds."""
    out: dict[str, list[str]] = {vip: [] for vip in vips}
    for label, spec, is_held in zip(labels, specs, held, strict=True):
        if is_held is True and label not in out[spec.vip]:
            out[spec.vip].append(label)
    return out


def health_lines(spec: model.VirtualServiceSpec, report: list | None) -> list[str]:
    """One line per checked real server, as the director's runtime judged it at the last
    apply or refresh, e.g. `TCP 203.0.113.201:80 -> 203.0.113.12:80 drained since
    2026-12-02T01:24:11Z: vip probe ...: Connection refused`; services without a check: none."""
    vip = model._hostport(spec.vip, spec.port)
    out = []
    for h in report or []:
        if h.get("state") in (None, "unchecked"):
            continue
        line = f"{spec.protocol.upper()} {vip} -> {model._hostport(h['address'], int(h['port']))} {h['state']}"
        if h.get("since"):
            line += f" since {h['since']}"
        if h.get("reason"):
            line += f": {h['reason']}"
        out.append(line)
    return out
