"""__main__.py under set_mocks: what it registers, with which inputs, and what it exports."""

from __future__ import annotations

import base64

import dill
import pulumi
import pytest

from tests.program import conftest
from tests.program.conftest import (
    DEV_CONFIG,
    PINNED_KEY,
    PRIVATE_KEY,
    VS_INPUTS,
    VS_TYPE,
    dev_config,
    dev_virtual_services,
    run_program,
)

DEPLOYMENT = "kubernetes:apps/v1:Deployment"
SERVICE = "kubernetes:core/v1:Service"
COMMAND = "command:remote:Command"
GUARD = "ipvs-ingress:index:ExternalIPGuard"
POLICY = "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicy"
BINDING = "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicyBinding"
KEY_MARKER = "test-only-marker-9f3c1e"


def test_resource_types_and_names(dev_run):
    names = {(r.typ, r.name) for r in dev_run.resources}
    assert names == {
        ("ipvs-ingress:index:WebApp", "nginx"),
        ("ipvs-ingress:index:Ingress", "ingress"),
        (GUARD, "external-ip-guard"),
        (POLICY, "external-ip-guard-policy"),
        (BINDING, "external-ip-guard-binding"),
        (DEPLOYMENT, "nginx"),
        (SERVICE, "nginx"),
        (VS_TYPE, "vs-tcp-203-0-113-201-80"),
        (VS_TYPE, "vs-tcp-203-0-113-202-80"),
        (VS_TYPE, "vs-udp-203-0-113-202-5353"),
        (VS_TYPE, "vs-tcp-2001-db8--201-80"),
    }


def test_children_are_parented_to_their_component(dev_run):
    for reg in dev_run.resources:
        if reg.typ in (DEPLOYMENT, SERVICE):
            assert reg.parent.endswith("ipvs-ingress:index:WebApp::nginx")
        elif reg.typ == VS_TYPE:
            assert reg.parent.endswith("ipvs-ingress:index:Ingress::ingress")
        elif reg.typ in (POLICY, BINDING):
            assert reg.parent.endswith(f"{GUARD}::external-ip-guard")
        else:
            assert reg.parent.endswith("pulumi:pulumi:Stack::ipvs-ingress-dev")


def test_deployment_image_replicas_and_labels(dev_run):
    dep = dev_run.one(DEPLOYMENT).inputs
    assert dep["metadata"]["name"] == "nginx"
    assert dep["metadata"]["namespace"] == "web-dev"
    spec = dep["spec"]
    assert spec["replicas"] == 3
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"] == "nginx:1.27.3"
    # app.containerPort is "http" (the probes' port); the UDP VIP port targets 80/UDP by name.
    assert container["ports"] == [
        {"name": "http", "containerPort": 80, "protocol": "TCP"},
        {"name": "udp-80", "containerPort": 80, "protocol": "UDP"},
    ]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/", "port": "http"}
    assert set(container["resources"]) == {"requests", "limits"}
    labels = spec["template"]["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/name": "nginx",
        "app.kubernetes.io/instance": "nginx-dev",
        "app.kubernetes.io/component": "web",
        "app.kubernetes.io/part-of": "ipvs-ingress",
        "app.kubernetes.io/managed-by": "pulumi",
    }
    # The selector picks the pods, and only by labels that never change.
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_service_external_ips_are_the_vips(dev_run):
    svc = dev_run.one(SERVICE).inputs
    assert svc["metadata"]["name"] == "nginx"
    assert svc["spec"]["externalIPs"] == [v["address"] for v in DEV_CONFIG["vips"]]
    assert svc["spec"]["ports"] == [
        {"name": "tcp-80", "port": 80, "protocol": "TCP", "targetPort": "http"},
        {"name": "udp-5353", "port": 5353, "protocol": "UDP", "targetPort": "udp-80"},
    ]
    dep = dev_run.one(DEPLOYMENT).inputs
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_one_virtual_service_per_vip_and_port_with_exact_inputs(dev_run):
    expected = dev_virtual_services()
    found = dev_run.of_type(VS_TYPE)
    assert sorted(r.name for r in found) == sorted(expected)
    for reg in found:
        assert {k: v for k, v in reg.inputs.items() if k in VS_INPUTS} == expected[reg.name]
        # Everything else is the provider's own bookkeeping (its pickle, declared outputs).
        assert set(reg.inputs) - VS_INPUTS <= {
            "__provider",
            "ipvsadm",
            "desired",
            "inSync",
            "vipBound",
            "ipForward",
        }


def test_virtual_services_depend_on_the_service(dev_run):
    service_urn = next(u for r in dev_run.of_type(VS_TYPE) for u in r.dependencies)
    assert service_urn.endswith("kubernetes:core/v1:Service::nginx")
    assert all(r.dependencies == [service_urn] for r in dev_run.of_type(VS_TYPE))


def test_outputs(dev_run):
    assert dev_run.outputs == {
        "vips": ["203.0.113.201", "203.0.113.202", "2001:db8::201"],
        "urls": [
            "http://203.0.113.201:80",
            "http://203.0.113.202:80",
            "udp://203.0.113.202:5353",
            "http://[2001:db8::201]:80",
        ],
        "virtualServices": [
            "TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1",
            "TCP 203.0.113.201:80 wlc -> 203.0.113.12:80 Route 3",
            "TCP 203.0.113.202:80 rr persistent 60 -> 203.0.113.11:80 Route 1",
            "TCP 203.0.113.202:80 rr persistent 60 -> 203.0.113.12:80 Route 3",
            "UDP 203.0.113.202:5353 rr persistent 60 -> 203.0.113.11:5353 Route 1",
            "UDP 203.0.113.202:5353 rr persistent 60 -> 203.0.113.12:5353 Route 3",
            "TCP [2001:db8::201]:80 wlc -> [2001:db8::11]:80 Route 1",
        ],
        "realServerHealth": [
            "TCP 203.0.113.201:80 -> 203.0.113.11:80 up",
            "TCP 203.0.113.201:80 -> 203.0.113.12:80 up",
            "TCP 203.0.113.202:80 -> 203.0.113.11:80 up",
            "TCP 203.0.113.202:80 -> 203.0.113.12:80 up",
            "UDP 203.0.113.202:5353 -> 203.0.113.11:5353 up",
            "UDP 203.0.113.202:5353 -> 203.0.113.12:5353 up",
            "TCP [2001:db8::201]:80 -> [2001:db8::11]:80 up",
        ],
        "service": "web-dev/nginx",
    }


def test_the_health_output_says_which_real_server_is_drained_or_held_and_why(monkeypatch):
    since = "2026-12-02T01:24:11Z"
    why = "vip probe 203.0.113.201:80 via 203.0.113.12: Connection refused"
    report = [
        {
            "address": "203.0.113.11",
            "port": 80.0,
            "state": "held",
            "since": since,
            "reason": why.replace(".12", ".11"),
            "weight": 1.0,
        },  # fmt: skip
        {
            "address": "203.0.113.12",
            "port": 80.0,
            "state": "drained",
            "since": since,
            "reason": why,
            "weight": 0.0,
        },  # fmt: skip
    ]
    monkeypatch.setitem(conftest.HEALTH_REPORTS, "vs-tcp-203-0-113-201-80", report)
    values = dev_config()
    values["health"] = {"check": "none"}
    values["vips"][0]["health"] = {"check": "vip"}
    run = run_program(values)
    assert run.outputs["realServerHealth"] == [
        f"TCP 203.0.113.201:80 -> 203.0.113.11:80 held since {since}: {why.replace('.12', '.11')}",
        f"TCP 203.0.113.201:80 -> 203.0.113.12:80 drained since {since}: {why}",
    ]  # the services whose check is none say nothing


def test_no_bootstrap_commands_by_default(dev_run):
    assert dev_run.of_type(COMMAND) == []
    assert dev_run.of_type("ipvs-ingress:index:DirectorBootstrap") == []


def test_bootstrap_commands_pin_the_host_key_and_keep_the_key_secret(bootstrap_run):
    commands = bootstrap_run.of_type(COMMAND)
    # Registration order is not theirs to keep: their aliases resolve asynchronously.
    assert sorted(c.name for c in commands) == [
        "ingress-bootstrap-ip-forward",
        "ingress-bootstrap-kernel-modules",
        "ingress-bootstrap-packages",
    ]
    for cmd in commands:
        assert cmd.parent.endswith("ipvs-ingress:index:DirectorBootstrap::ingress-bootstrap")
        conn = cmd.inputs["connection"]
        # A secret Output arrives wrapped: the whole connection is secret because the key is.
        assert conn[pulumi.runtime.rpc._special_sig_key] == pulumi.runtime.rpc._special_secret_sig
        conn = conn["value"]
        assert conn["host"] == "203.0.113.2"
        assert conn["hostKey"] == PINNED_KEY
        assert conn["privateKey"] == PRIVATE_KEY
        assert cmd.delete_before_replace
    script = " ".join(c.inputs["create"] for c in commands)
    for needle in ("ipvsadm", "python3-pip", "pyroute2==0.9.7", "ip_vs_wlc", "ip_vs_rr"):
        assert needle in script
    assert "net.ipv4.ip_forward" in script


def test_virtual_services_wait_for_the_bootstrap(bootstrap_run):
    command_urns = {u for r in bootstrap_run.of_type(VS_TYPE) for u in r.dependencies}
    assert {u.rsplit("::", 1)[1] for u in command_urns} == {
        "nginx",
        "ingress-bootstrap-packages",
        "ingress-bootstrap-kernel-modules",
        "ingress-bootstrap-ip-forward",
    }


def test_key_material_only_in_bootstrap_connections(bootstrap_run):
    run = bootstrap_run  # the key is in the stack config here
    for reg in run.resources:
        if reg.typ == COMMAND:
            continue
        assert KEY_MARKER not in reg.raw, reg.name
        assert "PRIVATE KEY" not in reg.raw, reg.name
    assert KEY_MARKER not in repr(run.outputs)


def test_bootstrap_without_a_key_is_one_line():
    with pytest.raises(pulumi.RunError) as err:
        run_program(dev_config(bootstrap=True))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("ipvs-ingress:sshPrivateKey: not set")
    assert "pulumi config set --secret sshPrivateKey" in message


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["vips"][1]["ports"][1].update(port=70000),
            "ipvs-ingress:vips[1].ports[1].port: 70000 is not a valid port",
        ),
        (
            lambda c: c["director"].pop("hostKey"),
            "ipvs-ingress:director.hostKey: None is not a pinned host key",
        ),
        (
            lambda c: c.update(app={"image": "nginx:latest"}),
            "ipvs-ingress:app.image: 'nginx:latest' is not a pinned image",
        ),
    ],
)
def test_config_errors_surface_as_one_line_run_errors(mutate, expected):
    values = dev_config()
    mutate(values)
    with pytest.raises(pulumi.RunError) as err:
        run_program(values)
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value)


def test_unparseable_config_value_is_one_line():
    with pytest.raises(pulumi.RunError) as err:
        run_program({**DEV_CONFIG, "vips": "203.0.113.201"})
    assert str(err.value).startswith("ipvs-ingress:vips: '203.0.113.201' is not a list of VIPs")


def test_config_value_that_is_not_json_is_one_line():
    with pytest.raises(pulumi.RunError) as err:
        run_program(DEV_CONFIG, raw={"app": "{name: nginx"})
    assert str(err.value).startswith("ipvs-ingress:app: '{name: nginx' is not JSON: ")
    assert str(err.value).endswith(
        "write it as YAML structure under config: in the stack file (see README.md)"
    )
    assert "\n" not in str(err.value)


def test_the_pickled_provider_holds_no_key(bootstrap_run):
    """The __provider each VirtualService carries, decoded: no key, no key attribute."""
    for reg in bootstrap_run.of_type(VS_TYPE):
        pickled = base64.b64decode(reg.inputs["__provider"])
        assert KEY_MARKER.encode() not in pickled and b"PRIVATE KEY" not in pickled
        assert not hasattr(dill.loads(pickled), "_private_key")


# --- configured values reach the resources; the Service and the pods agree (item 13) ---


def test_configured_director_fields_reach_every_resource_input():
    director = {"host": "Director.Example.NET", "user": "ops", "interface": "ens3", "port": 2222}
    run = run_program(dev_config(bootstrap=True, **director), private_key=PRIVATE_KEY)
    for reg in run.of_type(VS_TYPE):
        assert reg.inputs["director"] == {
            "host": "director.example.net",
            "port": 2222,
            "user": "ops",
            "hostKey": PINNED_KEY,
            "interface": "ens3",
        }, reg.name
    for cmd in run.of_type(COMMAND):
        conn = cmd.inputs["connection"]["value"]
        assert (conn["host"], conn["user"], conn["port"]) == ("director.example.net", "ops", 2222)
        assert cmd.inputs["create"].startswith("sudo -n sh -euc ")  # not root: through sudo


def named_targets(run) -> list[tuple[str, str, int]]:
    """(Service port name, protocol, the container port its targetPort names) for each port."""
    (container,) = run.one(DEPLOYMENT).inputs["spec"]["template"]["spec"]["containers"]
    declared = {p["name"]: (p["protocol"], p["containerPort"]) for p in container["ports"]}
    assert len(declared) == len(container["ports"])  # names are unique
    out = []
    for port in run.one(SERVICE).inputs["spec"]["ports"]:
        protocol, number = declared[port["targetPort"]]  # a KeyError is a port to nowhere
        assert protocol == port["protocol"], port
        out.append((port["name"], protocol, number))
    return out


def test_every_service_port_reaches_a_declared_container_port(dev_run):
    assert named_targets(dev_run) == [("tcp-80", "TCP", 80), ("udp-5353", "UDP", 80)]


def test_target_ports_are_declared_and_urls_follow_them():
    values = dev_config()
    values["app"]["containerPort"] = 8080
    values["vips"] = [
        {
            "address": "203.0.113.201",
            "ports": [{"port": 80}, {"port": 443, "targetPort": 8443}, {"port": 8080}],
        }
    ]
    values["realServers"] = values["realServers"][:2]
    run = run_program(values)
    assert named_targets(run) == [
        ("tcp-80", "TCP", 8080),
        ("tcp-443", "TCP", 8443),
        ("tcp-8080", "TCP", 8080),
    ]
    (container,) = run.one(DEPLOYMENT).inputs["spec"]["template"]["spec"]["containers"]
    assert container["ports"][0] == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert run.outputs["urls"] == [
        "http://203.0.113.201:80",
        "tcp://203.0.113.201:443",
        "http://203.0.113.201:8080",
    ]


# --- hostile config values through the program: one bounded line (item 10) ---


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('[{"address": "203.0.113.201", "ports": [{"port": 1e400}]}]', "vips[0].ports[0].port"),
        ('[{"address": "203.0.113.201", "ports": [{"port": NaN}]}]', "vips[0].ports[0].port"),
        (
            '[{"address": "203.0.113.201", "ports": [{"port": ' + "9" * 400 + "}]}]",
            "vips[0].ports[0].port",
        ),
        (
            '[{"address": "203.0.113.201", "ports": [{"port": 80}], "persistenceSeconds": '
            + "9" * 400
            + "}]",
            "vips[0].persistenceSeconds",
        ),
    ],
    ids=["1e400", "nan", "400-digits", "persistence-400-digits"],
)
def test_huge_numbers_in_the_config_are_one_line(raw, field):
    with pytest.raises(pulumi.RunError) as err:
        run_program(DEV_CONFIG, raw={"vips": raw})
    message = str(err.value)
    assert message.startswith(f"ipvs-ingress:{field}: ")
    assert "\n" not in message and len(message) <= 300


@pytest.mark.parametrize(
    "raw",
    ['{"port": ' + "9" * 5000 + "}", "{" + "x" * 1_000_000, "[" * 100_000],
    ids=["5000-digits", "1MB-not-json", "deep"],
)
def test_config_value_python_cannot_read_is_one_bounded_line(raw):
    with pytest.raises(pulumi.RunError) as err:
        run_program(DEV_CONFIG, raw={"director": raw})
    message = str(err.value)
    assert message.startswith("ipvs-ingress:director: ") and "is not JSON" in message
    assert "\n" not in message and len(message) <= 300
