"""The web app: an nginx Deployment and the Service whose externalIPs are the VIPs.

kube-proxy programs every node to accept traffic for a Service's externalIPs, which is what lets
the director forward VIP packets to the nodes unchanged (Direct Routing keeps the VIP as the
destination address).
"""

from __future__ import annotations

from typing import Any

import pulumi
from pulumi_kubernetes.apps.v1 import Deployment
from pulumi_kubernetes.core.v1 import Service

from components.config import App, StackConfig, VipPort

PART_OF = "ipvs-ingress"
# Small, fixed sizing for a static nginx; requests let the scheduler spread the replicas.
RESOURCES = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"cpu": "500m", "memory": "128Mi"},
}


def labels(app: App, instance: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels; `instance` tells stacks apart."""
    return {
        "app.kubernetes.io/name": app.name,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": "web",
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def selector(app: App, instance: str) -> dict[str, str]:
    # A Deployment's selector is immutable: keep it to the two labels that never change.
    all_labels = labels(app, instance)
    return {k: all_labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}


def container_port_name(port: int, protocol: str, app: App) -> str:
    """The named container port a Service port targets: "http" is app.containerPort over TCP,
    the port nginx serves and the probes check; any other is e.g. "tcp-8443" or "udp-5353"."""
    if (port, protocol) == (app.container_port, "tcp"):
        return "http"
    return f"{protocol}-{port}"  # at most 9 characters: a valid IANA_SVC_NAME


def deployment_spec(cfg: StackConfig, instance: str) -> dict[str, Any]:
    app = cfg.app
    probe = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10}
    container = {
        "name": app.name,
        "image": app.image,
        "ports": [
            {
                "name": container_port_name(port, protocol, app),
                "containerPort": port,
                "protocol": protocol.upper(),
            }
            for port, protocol in cfg.container_ports
        ],
        "readinessProbe": {**probe, "initialDelaySeconds": 2, "failureThreshold": 3},
        "livenessProbe": {**probe, "initialDelaySeconds": 10, "failureThreshold": 6},
        "resources": RESOURCES,
    }
    return {
        "replicas": app.replicas,
        "selector": {"matchLabels": selector(app, instance)},
        "template": {
            "metadata": {"labels": labels(app, instance)},
            "spec": {"containers": [container]},
        },
    }


def service_spec(cfg: StackConfig, instance: str) -> dict[str, Any]:
    return {
        "type": "ClusterIP",
        "selector": selector(cfg.app, instance),
        "externalIPs": [vip.address for vip in cfg.vips],
        # kube-proxy honours it for externalIPs: Local keeps the client's address (no SNAT) and
        # a node without a ready pod drops the VIP's traffic (its vip health probe fails then).
        "externalTrafficPolicy": cfg.app.external_traffic_policy,
        "ports": [
            {
                "name": p.name,
                "port": p.port,
                "protocol": p.protocol.upper(),
                "targetPort": _target(p, cfg.app),
            }
            for p in cfg.service_ports
        ],
    }


def _target(port: VipPort, app: App) -> str:
    # By name: the Deployment declares every target, so a Service port never points at nothing.
    return container_port_name(port.target_port, port.protocol, app)


class WebApp(pulumi.ComponentResource):
    deployment: Deployment
    service: Service
    service_name: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        instance: str,
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ipvs-ingress:index:WebApp", name, None, opts)
        app = cfg.app
        metadata = {"name": app.name, "namespace": app.namespace, "labels": labels(app, instance)}
        # Children wait for what the component waits for: the externalIP guard must name this
        # Service before it claims the VIPs (a renamed Service would be denied otherwise).
        child = pulumi.ResourceOptions(parent=self, depends_on=opts.depends_on if opts else None)
        self.deployment = Deployment(
            name, metadata=metadata, spec=deployment_spec(cfg, instance), opts=child
        )
        self.service = Service(
            name, metadata=metadata, spec=service_spec(cfg, instance), opts=child
        )
        self.service_name = pulumi.Output.concat(
            self.service.metadata.namespace, "/", self.service.metadata.name
        )
        self.register_outputs({"service": self.service_name})
