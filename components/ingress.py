"""The ingress: one IPVS virtual service per (VIP, port, protocol) on the director.

The VirtualService resources carry no key material: the provider reads `sshPrivateKey` from the
stack config itself, so the key never lands in their inputs, state or outputs. Only the optional
bootstrap commands take the key, as a secret Output.
"""

from __future__ import annotations

import pulumi

from components.bootstrap import DirectorBootstrap
from components.config import StackConfig
from providers import model
from providers.virtual_service import VirtualService


def resource_name(spec: model.VirtualServiceSpec) -> str:
    """A stable, readable name, e.g. vs-tcp-203-0-113-201-80 or vs-udp-2001-db8--1-53."""
    vip = spec.vip.replace(".", "-").replace(":", "-")
    return f"vs-{spec.protocol}-{vip}-{spec.port}"


class Ingress(pulumi.ComponentResource):
    bootstrap: DirectorBootstrap | None
    virtual_services: list[VirtualService]
    ipvsadm: pulumi.Output[list[str]]
    health: pulumi.Output[list[str]]

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
        self.bootstrap = None
        if cfg.bootstrap:
            if private_key is None:
                raise ValueError("director.bootstrap needs the SSH private key")
            self.bootstrap = DirectorBootstrap(
                f"{name}-bootstrap",
                cfg.director,
                cfg.schedulers,
                private_key,
                opts=pulumi.ResourceOptions(parent=self),
            )
            depends_on += self.bootstrap.commands
        # Ownership on the director is per stack: another stack's services there are never touched.
        # `repair` (ipvs-ingress:repair) and `health` (ipvs-ingress:health with the VIP's own
        # over it) are recorded with each service for the director runtime.
        owner = f"{pulumi.get_project()}/{pulumi.get_stack()}"
        self.virtual_services = [
            VirtualService(
                resource_name(spec),
                {
                    **model.to_props(cfg.director, spec, cfg.repair, dict(cfg.health[spec.key])),
                    "owner": owner,
                },
                opts=pulumi.ResourceOptions(parent=self, depends_on=depends_on),
            )
            for spec in cfg.virtual_services
        ]
        self.ipvsadm = pulumi.Output.all(*(vs.ipvsadm for vs in self.virtual_services)).apply(
            lambda tables: [line for table in tables for line in table or []]
        )
        self.health = pulumi.Output.all(
            *(vs.realServerHealth for vs in self.virtual_services)
        ).apply(
            lambda reports: [
                line
                for spec, report in zip(cfg.virtual_services, reports, strict=True)
                for line in health_lines(spec, report)
            ]
        )
        self.register_outputs({"virtualServices": self.ipvsadm, "realServerHealth": self.health})


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
