"""Run __main__.py under pulumi.runtime.set_mocks and record what it registers.

No CLI, no plugins, no cluster, no director: the mock monitor answers every registration with
the inputs it was given (plus the `ipvsadm` table a director would report for a virtual service,
written out here from the raw inputs without the model under test), and records the raw request
so tests can see parents, dependencies, options and secrets as the engine would.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pytest
from pulumi.runtime import mocks, settings

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "ipvs-ingress"
VS_TYPE = "pulumi-python:dynamic/ipvs:VirtualService"
HOST_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILE6ekFEGFpZ7fZ1ZLTl/3L2BjXlY/p5Zm1LMKDYsiGE "
    "root@director-dev"
)
# Not a usable key: a recognizable marker that must never show up outside bootstrap commands.
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAAtest-only-marker-9f3c1e\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)

PINNED_KEY = " ".join(HOST_KEY.split()[:2])  # the provider's normalized form: no comment
# The VirtualService inputs the program must declare, keyed by resource name: written out here,
# never computed with the model under test.
VS_INPUTS = {
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
}
# ipvs-ingress:health unset: the contract's defaults, written out (issue 9): a connect to the VIP
# through IPVS for tcp, kube-proxy's healthz for udp.
DEFAULT_TIMING = {
    "intervalSeconds": 1.0,
    "timeoutSeconds": 0.5,
    "rise": 2,
    "fall": 2,
    "depoolThreshold": 0.5,
    "kubeProxyPort": 10256,
}
TCP_HEALTH = {"check": "vip", **DEFAULT_TIMING}
UDP_HEALTH = {"check": "kubeProxy", **DEFAULT_TIMING}


def dev_virtual_services() -> dict[str, dict]:
    """The dev stack's VirtualServices, exactly as DEV_CONFIG must declare them."""
    director = {
        "host": "203.0.113.2",
        "port": 22,
        "user": "root",
        "hostKey": PINNED_KEY,
        "interface": "eth0",
    }
    v4 = [{"address": "203.0.113.11", "weight": 1}, {"address": "203.0.113.12", "weight": 3}]
    v6 = [{"address": "2001:db8::11", "weight": 1}]
    table = {
        "vs-tcp-203-0-113-201-80": ("203.0.113.201", 80, "tcp", "wlc", 0, v4),
        "vs-tcp-203-0-113-202-80": ("203.0.113.202", 80, "tcp", "rr", 60, v4),
        "vs-udp-203-0-113-202-5353": ("203.0.113.202", 5353, "udp", "rr", 60, v4),
        "vs-tcp-2001-db8--201-80": ("2001:db8::201", 80, "tcp", "wlc", 0, v6),
    }
    return {
        name: {
            "director": director,
            "vip": vip,
            "port": port,
            "protocol": protocol,
            "scheduler": scheduler,
            "persistenceSeconds": persistence,
            "realServers": real_servers,
            "owner": "ipvs-ingress/dev",  # <project>/<stack>: ownership on the director
            "repair": True,  # ipvs-ingress:repair, unset: the director runtime repairs drift
            "health": TCP_HEALTH if protocol == "tcp" else UDP_HEALTH,
        }
        for name, (vip, port, protocol, scheduler, persistence, real_servers) in table.items()
    }


DEV_CONFIG: dict[str, Any] = {
    "app": {"namespace": "web-dev", "image": "nginx:1.27.3", "replicas": 3},
    "vips": [
        {"address": "203.0.113.201", "ports": [{"port": 80, "protocol": "tcp"}]},
        {
            "address": "203.0.113.202",
            "ports": [{"port": 80, "protocol": "tcp"}, {"port": 5353, "protocol": "udp"}],
            "scheduler": "rr",
            "persistenceSeconds": 60,
        },
        {"address": "2001:db8::201", "ports": [{"port": 80}]},
    ],
    "realServers": [
        {"address": "203.0.113.11", "weight": 1},
        {"address": "203.0.113.12", "weight": 3},
        {"address": "2001:db8::11"},
    ],
    "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
}


# The kubeconfig itself as the stack's kubernetes:kubeconfig (pulumi-kubernetes takes a path or
# the contents): the program sees a cluster configured without a file on this machine.
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://192.0.2.10:6443"}}]
contexts: [{name: test, context: {cluster: test, user: test}}]
current-context: test
users: [{name: test, user: {token: test-only}}]
"""


def dev_config(**director: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(DEV_CONFIG)
    cfg["director"].update(director)
    return cfg


@dataclass
class Registration:
    typ: str
    name: str
    inputs: dict[str, Any]
    custom: bool
    parent: str
    dependencies: list[str]
    delete_before_replace: bool
    raw: str  # the serialized request object, secrets still wrapped
    aliases: list[str] = field(default_factory=list)  # each as the URN it names
    urn: str = ""  # by the engine's format (urn_of)


@dataclass
class Run:
    resources: list[Registration] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def of_type(self, typ: str) -> list[Registration]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> Registration:
        (found,) = self.of_type(typ)
        return found


class ProgramMocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        if args.typ == VS_TYPE:
            # What the provider returns after applying: the table read back from the kernel.
            state["ipvsadm"] = director_table(args.inputs)
            state["realServerHealth"] = HEALTH_REPORTS.get(args.name) or fresh_health(args.inputs)
            state["vipHeld"] = VIP_HELD.get(args.name)  # unset: the director did not say
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


# A test's own health reports by VirtualService name (what a director's runtime would say).
HEALTH_REPORTS: dict[str, list[dict]] = {}
# A test's own answer by VirtualService name: whether that director held the VIP.
VIP_HELD: dict[str, bool] = {}


def fresh_health(inputs: dict[str, Any]) -> list[dict]:
    """What a director reports for a service just created: every real server up (not yet
    failed), or unchecked when its check is none."""
    check = (inputs.get("health") or {}).get("check", "none")
    return [
        {
            "address": r["address"],
            "port": int(inputs["port"]),
            "state": "unchecked" if check == "none" else "up",
            "since": None,
            "reason": "",
            "weight": int(r["weight"]),
        }
        for r in inputs["realServers"]
    ]


def director_table(inputs: dict[str, Any]) -> list[str]:
    """`ipvsadm -Ln`-style lines for one virtual service, as a director holding exactly these
    inputs would list them: Direct Routing keeps the VIP's port, destinations sorted by address."""
    port = int(inputs["port"])

    def at(address: str) -> str:
        return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"

    head = f"{inputs['protocol'].upper()} {at(inputs['vip'])} {inputs['scheduler']}"
    if inputs["persistenceSeconds"]:
        head += f" persistent {int(inputs['persistenceSeconds'])}"
    servers = sorted(inputs["realServers"], key=lambda r: ipaddress.ip_address(r["address"]))
    return [f"{head} -> {at(r['address'])} Route {int(r['weight'])}" for r in servers]


class RecordingMonitor(mocks.MockMonitor):
    def __init__(self, run: Run):
        super().__init__(ProgramMocks())
        self.run = run

    def RegisterResource(self, request):  # noqa: N802 (gRPC method name)
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            from google.protobuf import json_format

            self.run.resources.append(
                Registration(
                    typ=request.type,
                    name=request.name,
                    inputs=_ints(pulumi.runtime.rpc.deserialize_properties(request.object)),
                    custom=request.custom,
                    parent=request.parent,
                    dependencies=list(request.dependencies),
                    delete_before_replace=request.deleteBeforeReplace,
                    raw=json_format.MessageToJson(request.object),
                    aliases=[alias_urn(request, a) for a in request.aliases],
                    urn=urn_of(request.parent, request.type, request.name),
                )
            )
        return response


def alias_urn(request, alias) -> str:
    """The URN an alias spec names (unset parts: the resource's own)."""
    if alias.urn:
        return alias.urn
    spec = alias.spec
    parent = "" if spec.noParent else (spec.parentUrn or request.parent)
    return urn_of(parent, spec.type or request.type, spec.name or request.name)


def urn_of(parent: str, typ: str, name: str) -> str:
    """A resource's URN by the engine's format, written out here rather than taken from the SDK
    or the mock monitor (which prefixes the root stack's type to its children's, as the engine
    does not): urn:pulumi:<stack>::<project>::<parent's type>$<type>::<name>."""
    stack, project, parent_type, _name = parent.split("::")
    parent_type = parent_type.removeprefix("pulumi:pulumi:Stack$")
    qualified = typ if parent_type == "pulumi:pulumi:Stack" else f"{parent_type}${typ}"
    return f"{stack}::{project}::{qualified}::{name}"


def _ints(value: Any) -> Any:
    """Numbers cross the wire as doubles; give whole ones back as ints, as the engine does."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def run_program(
    values: dict[str, Any],
    private_key: str | None = None,
    stack: str = "dev",
    raw: dict[str, str] | None = None,
    kubeconfig: str | None = KUBECONFIG,
    run: Run | None = None,
) -> Run:
    """Run __main__.py with `values` (bare keys) as the stack config; return what it did.

    `raw` sets config strings as-is (the engine hands structured values over as JSON text);
    `kubeconfig` is the stack's kubernetes:kubeconfig (None: unset); `run` records into a
    Run of the caller's, so what was registered stays visible when the program raises.
    """
    config = {f"{PROJECT}:{k}": json.dumps(v) for k, v in values.items()}
    config.update({f"{PROJECT}:{k}": v for k, v in (raw or {}).items()})
    if kubeconfig is not None:
        config["kubernetes:kubeconfig"] = kubeconfig
    if private_key is not None:
        config[f"{PROJECT}:sshPrivateKey"] = private_key
    run = Run() if run is None else run
    settings.set_root_resource(None)  # a fresh Stack per run, so outputs never leak between runs
    pulumi.runtime.set_mocks(
        ProgramMocks(), project=PROJECT, stack=stack, preview=False, monitor=RecordingMonitor(run)
    )
    pulumi.runtime.set_all_config(config, [f"{PROJECT}:sshPrivateKey"])

    @pulumi.runtime.test
    def program():
        runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")
        exported = settings.get_root_resource().outputs
        return pulumi.Output.all(**exported).apply(run.outputs.update)

    program()
    return run


@pytest.fixture(scope="module")
def dev_run() -> Run:
    return run_program(DEV_CONFIG)


@pytest.fixture(scope="module")
def bootstrap_run() -> Run:
    return run_program(dev_config(bootstrap=True), private_key=PRIVATE_KEY)
