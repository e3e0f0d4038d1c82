"""components/config.py: defaults, the dataclasses it builds, and one-line errors by config path."""

from __future__ import annotations

import copy
import ipaddress
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import APP_DEFAULTS, ConfigError, load, load_stack_file
from providers import model
from tests.program.conftest import DEV_CONFIG, HOST_KEY

MINIMAL = {
    "vips": [{"address": "203.0.113.201", "ports": [{"port": 80}]}],
    "realServers": [{"address": "203.0.113.11"}],
    "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
}


def echo(value) -> str:
    """How a bad value is shown in a message: its repr, at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def with_change(base: dict, change) -> dict:
    values = copy.deepcopy(base)
    change(values)
    return values


def error_for(values: dict) -> str:
    with pytest.raises(ConfigError) as err:
        load(values)
    return str(err.value)


def test_defaults_fill_everything_not_given():
    cfg = load(MINIMAL)
    assert cfg.app.name == APP_DEFAULTS["name"] == "nginx"
    assert (cfg.app.namespace, cfg.app.image) == ("default", "nginx:1.27.3")
    assert (cfg.app.replicas, cfg.app.container_port) == (2, 80)
    (vip,) = cfg.vips
    assert (vip.scheduler, vip.persistence_seconds) == ("wlc", 0)
    assert [(p.port, p.protocol, p.name) for p in vip.ports] == [(80, "tcp", "tcp-80")]
    assert cfg.real_servers == (model.RealServer("203.0.113.11", 1),)
    d = cfg.director
    assert (d.port, d.user, d.interface, d.proxy_command) == (22, "root", "eth0", None)
    assert cfg.bootstrap is False


def test_virtual_services_are_the_providers_own_specs():
    cfg = load(DEV_CONFIG)
    assert [s.key for s in cfg.virtual_services] == [
        "tcp/203.0.113.201:80",
        "tcp/203.0.113.202:80",
        "udp/203.0.113.202:5353",
        "tcp/[2001:db8::201]:80",
    ]
    # Each VIP gets the real servers of its own family: dual-stack nodes list both addresses.
    v6 = cfg.virtual_services[-1]
    assert v6.real_servers == (model.RealServer("2001:db8::11", 1),)
    assert cfg.schedulers == ("rr", "wlc")


def test_addresses_and_case_are_normalized():
    values = with_change(
        MINIMAL,
        lambda v: v["vips"][0].update(
            address="2001:DB8:0::1", ports=[{"port": 53, "protocol": "UDP"}]
        ),
    )
    values["realServers"] = [{"address": "2001:db8:0:0::11"}]
    cfg = load(values)
    assert cfg.vips[0].address == "2001:db8::1"
    assert cfg.vips[0].ports[0].protocol == "udp"
    assert cfg.real_servers[0].address == "2001:db8::11"
    assert cfg.urls == ("udp://[2001:db8::1]:53",)


def test_proxy_command_is_kept():
    values = with_change(MINIMAL, lambda v: v["director"].update(proxyCommand="ssh -W %h:%p jump"))
    assert load(values).director.proxy_command == "ssh -W %h:%p jump"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda v: v["vips"][0]["ports"].append({"port": 80.5}),
            "ipvs-ingress:vips[0].ports[1].port: 80.5 is not a valid port: use a whole number from 1 to 65535",
        ),
        (
            lambda v: v["vips"][0]["ports"][0].update(protocol="sctp"),
            "ipvs-ingress:vips[0].ports[0].protocol: 'sctp' is not supported: use one of tcp, udp",
        ),
        (
            lambda v: v["vips"][0].update(scheduler="round-robin"),
            "ipvs-ingress:vips[0].scheduler: 'round-robin' is not supported: use one of rr, wrr",
        ),
        (
            lambda v: v["vips"][0].update(persistenceSeconds=-5),
            "ipvs-ingress:vips[0].persistenceSeconds: -5 is not a valid persistence timeout",
        ),
        (
            lambda v: v["vips"][0].update(address="203.0.113.300"),
            "ipvs-ingress:vips[0].address: '203.0.113.300' is not an IP address",
        ),
        (
            lambda v: v["vips"].append({"address": "203.0.113.201", "ports": [{"port": 443}]}),
            "ipvs-ingress:vips[1].address: '203.0.113.201' repeats ipvs-ingress:vips[0].address",
        ),
        (
            lambda v: v["vips"][0]["ports"].append({"port": 80, "protocol": "tcp"}),
            "ipvs-ingress:vips[0].ports[1]: tcp/80 repeats ipvs-ingress:vips[0].ports[0]: list each port once",
        ),
        (
            lambda v: v["vips"][0].update(ports=[]),
            "ipvs-ingress:vips[0].ports: [] is not a list of ports",
        ),
        (
            lambda v: v.update(vips=[]),
            "ipvs-ingress:vips: [] is not a list of VIPs: give at least one",
        ),
        (
            lambda v: v["vips"][0].update(adress="203.0.113.9"),
            "ipvs-ingress:vips[0].adress: unknown key 'adress': did you mean 'address'?",
        ),
        (
            lambda v: v["realServers"].append({"address": "203.0.113.11"}),
            "ipvs-ingress:realServers[1].address: '203.0.113.11' repeats realServers[0]",
        ),
        (
            lambda v: v["realServers"][0].update(weight=70000),
            "ipvs-ingress:realServers[0].weight: 70000 is not a valid weight: use a whole number from 0 to 65535",
        ),
        (
            lambda v: v["realServers"][0].update(wieght=2),
            "ipvs-ingress:realServers[0].wieght: unknown key 'wieght': did you mean 'weight'?",
        ),
        (
            lambda v: v["realServers"].append({"address": "2001:db8::11"}),
            "ipvs-ingress:realServers[1].address: '2001:db8::11' is IPv6 but no VIP is",
        ),
        (
            lambda v: v.update(realServers=[{"address": "203.0.113.201"}]),
            "ipvs-ingress:realServers[0].address: '203.0.113.201' is the VIP itself",
        ),
        (
            lambda v: v.update(realServers=[]),
            "ipvs-ingress:realServers: [] is not a list of real servers",
        ),
        (
            lambda v: v["vips"][0].update(address="2001:db8::1"),
            "ipvs-ingress:vips[0].address: '2001:db8::1' has no real server of its address family",
        ),
        (
            lambda v: v["director"].update(hostKey="ssh-ed25519 AAAA"),
            "ipvs-ingress:director.hostKey: 'ssh-ed25519 AAAA' is not a pinned host key",
        ),
        (
            lambda v: v["director"].update(port="22"),
            "ipvs-ingress:director.port: '22' is not a valid SSH port",
        ),
        (
            lambda v: v["director"].update(interface="eth 0"),
            "ipvs-ingress:director.interface: 'eth 0' is not a network interface name",
        ),
        (
            lambda v: v["director"].update(bootstrap="yes"),
            "ipvs-ingress:director.bootstrap: 'yes' is not a boolean",
        ),
        (
            lambda v: v["director"].update(bootstrap=True, proxyCommand="nc %h %p"),
            "ipvs-ingress:director.bootstrap: true cannot go through director.proxyCommand",
        ),
        (
            lambda v: v.update(director="203.0.113.2"),
            "ipvs-ingress:director: '203.0.113.2' is not an object",
        ),
        (
            lambda v: v.update(app={"name": "Web_App"}),
            "ipvs-ingress:app.name: 'Web_App' is not a Kubernetes Service name",
        ),
        (
            lambda v: v.update(app={"namespace": "-web"}),
            "ipvs-ingress:app.namespace: '-web' is not a namespace name",
        ),
        (
            lambda v: v.update(app={"image": "nginx"}),
            "ipvs-ingress:app.image: 'nginx' is not a pinned image: give a tag or digest",
        ),
        (
            lambda v: v.update(app={"replicas": True}),
            "ipvs-ingress:app.replicas: True is not a valid replica count",
        ),
        (
            lambda v: v.update(app={"containerPort": 0}),
            "ipvs-ingress:app.containerPort: 0 is not a valid container port",
        ),
        (
            lambda v: v.update(app={"replica": 3}),
            "ipvs-ingress:app.replica: unknown key 'replica': did you mean 'replicas'?",
        ),
    ],
)
def test_bad_input_names_field_value_and_fix(change, expected):
    message = error_for(with_change(MINIMAL, change))
    assert message.startswith(expected)
    assert "\n" not in message
    assert message.count(": ") >= 2  # "<path>: <value and what is wrong>: <fix>"


def test_several_problems_are_all_named_on_one_line():
    values = with_change(
        MINIMAL, lambda v: v["vips"][0].update(scheduler="x", persistenceSeconds=-1)
    )
    values["realServers"][0]["weight"] = -1
    values["app"] = {"replicas": -1}
    with pytest.raises(ConfigError) as err:
        load(values)
    message = str(err.value)
    assert "\n" not in message and len(message) <= 300
    assert len(err.value.problems) == 4
    shown = message.count("ipvs-ingress:")
    assert shown >= 2
    assert message.endswith(f"(and {4 - shown} more)")


def test_shared_problems_are_reported_once():
    values = copy.deepcopy(DEV_CONFIG)
    values["realServers"][0]["weight"] = -1  # shared by three IPv4 virtual services
    with pytest.raises(ConfigError) as err:
        load(values)
    assert [p.field for p in err.value.problems] == ["ipvs-ingress:realServers[0].weight"]


def test_stack_file_keys_must_be_known():
    config = {f"ipvs-ingress:{k}": v for k, v in MINIMAL.items()}
    config["ipvs-ingress:vip"] = []
    config["kubernetes:context"] = "dev"  # other namespaces are not ours to judge
    with pytest.raises(ConfigError, match=r"^ipvs-ingress:vip: unknown key 'vip': did you mean"):
        load_stack_file(config)


# --- properties -------------------------------------------------------------------------------

ports = st.lists(
    st.tuples(st.integers(1, 65535), st.sampled_from(["tcp", "udp"])),
    min_size=1,
    max_size=4,
    unique=True,
)
hosts = st.integers(1, 254).map(lambda n: f"198.51.100.{n}")


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    vips=st.lists(st.tuples(hosts, ports), min_size=1, max_size=3, unique_by=lambda t: t[0]),
    scheduler=st.sampled_from(model.SCHEDULERS),
    weights=st.lists(st.integers(0, 65535), min_size=1, max_size=4),
)
def test_any_valid_config_yields_one_spec_per_vip_and_port(vips, scheduler, weights):
    real_servers = [{"address": f"192.0.2.{i + 1}", "weight": w} for i, w in enumerate(weights)]
    values = {
        "vips": [
            {
                "address": a,
                "ports": [{"port": p, "protocol": q} for p, q in ps],
                "scheduler": scheduler,
            }
            for a, ps in vips
        ],
        "realServers": real_servers,
        "director": MINIMAL["director"],
    }
    cfg = load(values)
    assert len(cfg.virtual_services) == sum(len(ps) for _, ps in vips)
    assert {s.key for s in cfg.virtual_services} == {
        f"{q}/{a}:{p}" for a, ps in vips for p, q in ps
    }
    assert all(len(s.real_servers) == len(weights) for s in cfg.virtual_services)
    assert len(cfg.urls) == len(cfg.virtual_services)


@settings(max_examples=60)
@given(port=st.one_of(st.integers(max_value=0), st.integers(min_value=65536), st.text(max_size=5)))
def test_any_bad_port_is_one_line_naming_path_and_value(port):
    values = with_change(MINIMAL, lambda v: v["vips"][0]["ports"].append({"port": port}))
    message = error_for(values)
    assert message.startswith("ipvs-ingress:vips[0].ports[1].port: ")
    assert repr(port)[:30] in message
    assert "use a whole number from 1 to 65535" in message
    assert "\n" not in message


@settings(max_examples=60)
@given(name=st.text(min_size=1, max_size=12).filter(lambda s: s.lower() not in model.SCHEDULERS))
def test_any_unknown_scheduler_is_refused_with_the_list(name):
    message = error_for(with_change(MINIMAL, lambda v: v["vips"][0].update(scheduler=name)))
    assert message.startswith(f"ipvs-ingress:vips[0].scheduler: {echo(name)} is not supported")
    assert "use one of rr, wrr, lc, wlc" in message
    assert "\n" not in message


@settings(max_examples=60)
@given(address=st.text(max_size=20).filter(lambda s: not _is_ip(s)))
def test_any_non_address_vip_is_refused(address):
    message = error_for(with_change(MINIMAL, lambda v: v["vips"][0].update(address=address)))
    assert re.match(r"^ipvs-ingress:vips\[0\]\.address: .* is not an IP address", message)
    assert "\n" not in message


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("port", [[80], {"n": 80}])
def test_a_port_of_the_wrong_shape_is_a_config_error_not_a_crash(port):
    cfg = {
        **DEV_CONFIG,
        "vips": [{"address": "203.0.113.201", "ports": [{"port": port}, {"port": port}]}],
    }
    with pytest.raises(ConfigError) as err:
        load(cfg)
    assert "ipvs-ingress:vips[0].ports[0].port: " in str(err.value)
    assert "repeats" in str(err.value)  # the duplicate check still ran
