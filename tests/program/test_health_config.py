"""ipvs-ingress:health and vips[i].health (issue 9): the stack's health check defaults with a
VIP's own over them, resolved per (VIP, port) into each VirtualService's `health` input with
every key filled; every bad value is one line naming where it was set, the value and the fix,
before any resource. And app.externalTrafficPolicy (Cluster | Local) on the Service.

Expected resolved settings are written out here, not computed with the loader.
"""

from __future__ import annotations

import copy

import kubernetes_validate
import pulumi
import pytest

from components.config import ConfigError, load, load_stack_file
from tests.program.conftest import (
    DEFAULT_TIMING,
    DEV_CONFIG,
    TCP_HEALTH,
    UDP_HEALTH,
    VS_TYPE,
    Run,
    dev_virtual_services,
    run_program,
)

SERVICE = "kubernetes:core/v1:Service"
# The dev config's services: 203.0.113.201 tcp/80, 203.0.113.202 tcp/80 and udp/5353, 2001:db8::201 tcp/80.
K201, K202, K202U, K6 = (
    "tcp/203.0.113.201:80",
    "tcp/203.0.113.202:80",
    "udp/203.0.113.202:5353",
    "tcp/[2001:db8::201]:80",
)
GET = {"path": "/healthz", "expectStatus": 200}


def config(stack=None, **per_vip) -> dict:
    """DEV_CONFIG with ipvs-ingress:health `stack` and vips[i].health per_vip["v<i>"]."""
    values = copy.deepcopy(DEV_CONFIG)
    if stack is not None:
        values["health"] = stack
    for name, health in per_vip.items():
        values["vips"][int(name[1:])]["health"] = health
    return values


def refused(values) -> str:
    with pytest.raises(ConfigError) as err:
        load(values)
    text = str(err.value)
    assert "\n" not in text and len(text) <= 300
    return text


def test_unset_means_the_defaults_per_protocol():
    assert load(DEV_CONFIG).health == {K201: TCP_HEALTH, K202: TCP_HEALTH, K202U: UDP_HEALTH, K6: TCP_HEALTH}  # fmt: skip
    assert load(config({})).health == load(DEV_CONFIG).health
    assert load(config(None, v0=None)).health == load(DEV_CONFIG).health


def test_the_stack_sets_defaults_and_a_vip_overrides_them_key_by_key():
    values = config(
        {"intervalSeconds": 2, "timeoutSeconds": 1, "rise": 3, "http": GET},
        v1={"fall": 5, "depoolThreshold": 0},
        v2={"check": "none", "http": None},
    )
    timing = {**DEFAULT_TIMING, "intervalSeconds": 2.0, "timeoutSeconds": 1.0, "rise": 3}
    assert load(values).health == {
        K201: {"check": "vip", **timing, "http": GET},
        K202: {"check": "vip", **timing, "fall": 5, "depoolThreshold": 0.0, "http": GET},
        # the stack's http is for vip checks: the udp port's default kubeProxy takes none
        K202U: {"check": "kubeProxy", **timing, "fall": 5, "depoolThreshold": 0.0},
        K6: {"check": "none", **timing},
    }


def test_a_vips_own_check_other_than_vip_leaves_the_stacks_http_out():
    values = config({"http": GET}, v0={"check": "kubeProxy", "kubeProxyPort": 10257})
    assert load(values).health[K201] == {**UDP_HEALTH, "kubeProxyPort": 10257}
    assert load(values).health[K202] == {**TCP_HEALTH, "http": GET}


def test_the_timeout_default_follows_a_short_interval():
    values = config({"intervalSeconds": 0.2})
    assert load(values).health[K201] == {**TCP_HEALTH, "intervalSeconds": 0.2, "timeoutSeconds": 0.2}  # fmt: skip


def test_numbers_as_the_engine_hands_them_over():
    values = config({"rise": 3.0, "fall": 1, "kubeProxyPort": 10256.0, "http": {"expectStatus": 204.0}})  # fmt: skip
    got = load(values).health[K201]
    assert got == {**TCP_HEALTH, "rise": 3, "fall": 1, "http": {"path": "/", "expectStatus": 204}}
    assert type(got["rise"]) is int and type(got["http"]["expectStatus"]) is int


def test_as_a_stack_file():
    stack = {f"ipvs-ingress:{k}": v for k, v in config({"rise": 4}).items()}
    assert load_stack_file(stack).health[K201] == {**TCP_HEALTH, "rise": 4}


# (stack, per VIP, the one line) - each problem named where its value was set.
REFUSED = [
    (
        {"rise": 0}, {},
        "ipvs-ingress:health.rise: 0 is not a valid count of successes that restore a drained server: use a whole number from 1 to 10",
    ),
    (
        {}, {"v1": {"fall": "2"}},
        "ipvs-ingress:vips[1].health.fall: '2' is not a valid count of failures that drain a server: use a whole number from 1 to 10",
    ),
    (
        {"check": "vip"}, {},
        "ipvs-ingress:health.check: 'vip' cannot check a udp port (a TCP connect cannot test a UDP service): use kubeProxy or none, or leave check unset (vip for tcp, kubeProxy for udp)",
    ),
    (
        {}, {"v1": {"check": "vip"}},
        "ipvs-ingress:vips[1].health.check: 'vip' cannot check a udp port (a TCP connect cannot test a UDP service): use kubeProxy or none, or leave check unset (vip for tcp, kubeProxy for udp)",
    ),
    (
        {"intervalSeconds": 1}, {"v0": {"timeoutSeconds": 1.5}},
        "ipvs-ingress:vips[0].health.timeoutSeconds: 1.5 is not a probe timeout: use seconds from 0.1 up to intervalSeconds (1)",
    ),
    (
        {"intervalSeconds": 61}, {},
        "ipvs-ingress:health.intervalSeconds: 61 is not a probe interval: use seconds from 0.2 to 60, e.g. 1 or 0.5",
    ),
    (
        {"http": {"path": "/a\nb"}}, {},
        "ipvs-ingress:health.http.path: '/a\\nb' is not a request path: give one starting with '/', at most 200 ASCII characters, no spaces or control characters, e.g. /healthz",
    ),
    (
        {}, {"v0": {"check": "none", "http": GET}},
        "ipvs-ingress:vips[0].health.http: {'path': '/healthz', 'expectStatus': ... is set but check is 'none': an HTTP GET needs check vip; remove http, or give http: null where check is kubeProxy or none",
    ),
    (
        {"depoolTreshold": 0.5}, {},
        "ipvs-ingress:health.depoolTreshold: unknown key 'depoolTreshold': use only check, intervalSeconds, timeoutSeconds, rise, fall, http, depoolThreshold, kubeProxyPort",
    ),
    (
        [], {},
        "ipvs-ingress:health: [] is not an object: give {check, intervalSeconds, timeoutSeconds, rise, fall, http, depoolThreshold, kubeProxyPort}, each optional",
    ),
    (
        {}, {"v2": "vip"},
        "ipvs-ingress:vips[2].health: 'vip' is not an object: give any of the keys of ipvs-ingress:health to override them for this VIP",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("stack", "per_vip", "line"), REFUSED)
def test_a_bad_health_is_one_line_naming_where_it_was_set(stack, per_vip, line):
    assert refused(config(stack, **per_vip)) == line


def test_several_problems_are_counted_once_each():
    text = refused(config({"rise": 0, "fall": 0}, v1={"kubeProxyPort": 0}))
    assert text.startswith("ipvs-ingress:health.rise: 0 is not")
    assert text.endswith("(and 1 more)")  # rise, fall, kubeProxyPort: not one per port


def test_a_bad_health_stops_the_program_before_any_resource():
    run = Run()
    with pytest.raises(pulumi.RunError) as err:
        run_program(config({"fall": 11}), run=run)
    assert str(err.value).startswith("ipvs-ingress:health.fall: 11 is not a valid count")
    assert run.resources == []


def test_every_virtual_service_gets_its_resolved_health():
    run = run_program(config({"rise": 3}, v2={"check": "none"}))
    expected = dev_virtual_services()
    found = {r.name: r.inputs for r in run.of_type(VS_TYPE)}
    assert sorted(found) == sorted(expected)
    assert found["vs-tcp-203-0-113-201-80"]["health"] == {**TCP_HEALTH, "rise": 3}
    assert found["vs-udp-203-0-113-202-5353"]["health"] == {**UDP_HEALTH, "rise": 3}
    assert found["vs-tcp-2001-db8--201-80"]["health"] == {**TCP_HEALTH, "check": "none", "rise": 3}  # fmt: skip


# --- app.externalTrafficPolicy ------------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, "Cluster", "Local"])
def test_the_service_carries_the_traffic_policy(policy):
    values = copy.deepcopy(DEV_CONFIG)
    if policy is not None:
        values["app"]["externalTrafficPolicy"] = policy
    assert load(values).app.external_traffic_policy == (policy or "Cluster")
    svc = run_program(values).one(SERVICE).inputs
    assert svc["spec"]["externalTrafficPolicy"] == (policy or "Cluster")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["externalIPs"]
    for version in ("1.33", "1.37"):
        assert kubernetes_validate.validate(svc, version, strict=True) == version


@pytest.mark.parametrize("bad", ["local", "LOCAL", "Node", "", None, True, ["Local"], "x" * 300])
def test_a_bad_traffic_policy_is_one_line(bad):
    values = copy.deepcopy(DEV_CONFIG)
    values["app"]["externalTrafficPolicy"] = bad
    shown = repr(bad) if len(repr(bad)) <= 40 else repr(bad)[:37] + "..."
    assert refused(values) == (
        f"ipvs-ingress:app.externalTrafficPolicy: {shown} is not a traffic policy: use Cluster"
        " (the default: pods see a node's address) or Local (pods see the client's own address;"
        " a node without a ready pod drops VIP traffic and is drained)"
    )
