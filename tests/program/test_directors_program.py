"""ipvs-ingress:directors applied (issue 10): every director holds the same table, each of its
VirtualServices with its own part in the VRRP group; the first listed director keeps the names
(and so the URNs, through aliases) of a stack that had it as ipvs-ingress:director; outputs per
director and which director holds each VIP; a bootstrap per director, keepalived included.

Everything expected is written out here (names, URNs by the engine's format, the vrrp parts),
never computed with the code under test.
"""

from __future__ import annotations

import copy

import pulumi
import pytest

from components.config import load
from components.ingress import service_props
from tests.program import conftest
from tests.program.conftest import (
    DEV_CONFIG,
    HOST_KEY,
    PINNED_KEY,
    PRIVATE_KEY,
    VS_TYPE,
    dev_virtual_services,
    run_program,
)

COMMAND = "command:remote:Command"
BOOTSTRAP = "ipvs-ingress:index:DirectorBootstrap"
SERVICES = [  # the dev stack's, in config order
    "vs-tcp-203-0-113-201-80",
    "vs-tcp-203-0-113-202-80",
    "vs-udp-203-0-113-202-5353",
    "vs-tcp-2001-db8--201-80",
]
A, B = "203.0.113.2", "203.0.113.3"


def pair_config(bootstrap: bool = False, vrrp: dict | None = None) -> dict:
    """The dev stack with its director as the first of two (priority 150), a second one after."""
    values = copy.deepcopy(DEV_CONFIG)
    first = {**values.pop("director"), "priority": 150, "bootstrap": bootstrap}
    second = {"host": B, "hostKey": HOST_KEY, "priority": 100, "interface": "ens3"}
    values["directors"] = [first, {**second, "bootstrap": bootstrap}]
    if vrrp is not None:
        values["vrrp"] = vrrp
    return values


def single_config(bootstrap: bool = False) -> dict:
    values = copy.deepcopy(DEV_CONFIG)
    values["director"]["bootstrap"] = bootstrap
    return values


# What each director's services must be: the single director's inputs, that director's own
# `director`, and its part in the group.
B_DIRECTOR = {"host": B, "port": 22, "user": "root", "hostKey": PINNED_KEY, "interface": "ens3"}
PARTS = {
    A: {"virtualRouterId": 51, "priority": 150, "address": A, "peers": [B], "advertSeconds": 0.1},
    B: {"virtualRouterId": 51, "priority": 100, "address": B, "peers": [A], "advertSeconds": 0.1},
}


def expected_pair() -> list[tuple[str, str, dict]]:
    single = dev_virtual_services()
    out = []
    for host in (A, B):
        for name in SERVICES:
            props = {**single[name], "vrrp": PARTS[host]}
            if host == B:
                props["director"] = B_DIRECTOR
            out.append((f"{name}-on-{host.replace('.', '-')}", host, props))
    return out


def test_service_props_lists_each_directors_services_in_order_with_its_vrrp_part():
    declared = service_props(load(pair_config()), "ipvs-ingress/dev")
    got = [(name, d.director.host, props) for name, d, props in declared]
    assert got == expected_pair()


def test_service_props_of_one_director_are_the_old_names_and_inputs_without_vrrp():
    declared = service_props(load(single_config()), "ipvs-ingress/dev")
    assert [(n, p) for n, _d, p in declared] == list(dev_virtual_services().items())


def test_the_stacks_vrrp_settings_reach_every_part():
    settings = {"virtualRouterId": 7.0, "advertSeconds": 0.05, "preemptDelaySeconds": 30}
    declared = service_props(load(pair_config(vrrp=settings)), "ipvs-ingress/dev")
    shared = {"virtualRouterId": 7, "advertSeconds": 0.05, "preemptDelaySeconds": 30}
    assert {p["vrrp"]["address"]: p["vrrp"] for _n, _d, p in declared} == {
        A: {**PARTS[A], **shared},
        B: {**PARTS[B], **shared},
    }


def test_three_directors_each_peer_with_the_other_two_sorted():
    values = pair_config()
    values["directors"].insert(0, {"host": "203.0.113.9", "hostKey": HOST_KEY, "priority": 200})
    declared = service_props(load(values), "o/s")
    peers = {p["vrrp"]["address"]: p["vrrp"]["peers"] for _n, _d, p in declared}
    assert peers == {
        "203.0.113.9": [A, B],
        A: [B, "203.0.113.9"],
        B: [A, "203.0.113.9"],
    }


def test_the_program_registers_every_directors_services():
    run = run_program(pair_config())
    found = {r.name: r.inputs for r in run.of_type(VS_TYPE)}
    expected = {name: props for name, _host, props in expected_pair()}
    assert sorted(found) == sorted(expected)
    for name, props in expected.items():
        assert {k: v for k, v in found[name].items() if k in props} == props


@pytest.fixture(scope="module")
def single_run():
    return run_program(single_config(bootstrap=True), private_key=PRIVATE_KEY)


@pytest.fixture(scope="module")
def pair_run():
    return run_program(pair_config(bootstrap=True), private_key=PRIVATE_KEY)


def test_turning_director_into_directors_keeps_the_first_ones_urns_by_alias(single_run, pair_run):
    old = {r.name: r.urn for r in single_run.of_type(VS_TYPE)}
    new = {r.name: r for r in pair_run.of_type(VS_TYPE)}
    assert sorted(old) == sorted(SERVICES)
    for name in SERVICES:
        # The engine moves the old state to the first director's resource (an update) ...
        assert new[f"{name}-on-203-0-113-2"].aliases == [old[name]]
        # ... and creates the second director's: nothing old is claimed by it.
        assert new[f"{name}-on-203-0-113-3"].aliases == []
    assert not set(old.values()) & {r.urn for r in new.values()}


def test_the_first_directors_bootstrap_commands_keep_their_urns_too(single_run, pair_run):
    old = {r.name: r.urn for r in single_run.of_type(COMMAND)}
    new = {r.name: r for r in pair_run.of_type(COMMAND)}
    for step in ("packages", "kernel-modules", "ip-forward"):
        assert new[f"ingress-bootstrap-on-203-0-113-2-{step}"].aliases == [
            old[f"ingress-bootstrap-{step}"]
        ]
    (component,) = [r for r in pair_run.of_type(BOOTSTRAP) if r.name.endswith("113-2")]
    (former,) = single_run.of_type(BOOTSTRAP)
    assert component.aliases == [former.urn]


def test_back_to_one_director_aliases_its_suffixed_names(single_run, pair_run):
    suffixed = {r.name: r.urn for r in pair_run.of_type(VS_TYPE)}
    for reg in single_run.of_type(VS_TYPE):
        assert reg.aliases == [suffixed[f"{reg.name}-on-203-0-113-2"]]


def test_only_vrrp_differs_between_the_single_and_the_first_directors_inputs():
    one = {n: p for n, _d, p in service_props(load(single_config()), "ipvs-ingress/dev")}
    two = {n: p for n, _d, p in service_props(load(pair_config()), "ipvs-ingress/dev")}
    for name, props in one.items():
        first = two[f"{name}-on-203-0-113-2"]
        assert {k for k in props.keys() | first.keys() if props.get(k) != first.get(k)} == {"vrrp"}


def test_each_director_gets_its_own_bootstrap_with_keepalived(pair_run):
    commands = {r.name: r for r in pair_run.of_type(COMMAND)}
    steps = ("packages", "kernel-modules", "ip-forward", "keepalived")
    assert sorted(commands) == sorted(
        f"ingress-bootstrap-on-{h}-{s}" for h in ("203-0-113-2", "203-0-113-3") for s in steps
    )
    for name, cmd in commands.items():
        host = A if "113-2" in name else B
        assert cmd.parent.endswith(f"{BOOTSTRAP}::ingress-bootstrap-on-{host.replace('.', '-')}")
        assert cmd.inputs["connection"]["value"]["host"] == host
        assert cmd.inputs["connection"]["value"]["hostKey"] == PINNED_KEY
    keepalived = commands["ingress-bootstrap-on-203-0-113-3-keepalived"].inputs["create"]
    assert "apt-get install -y -q --no-install-recommends keepalived" in keepalived
    assert "systemctl disable --now keepalived.service" in keepalived


def test_a_directors_services_wait_for_its_own_bootstrap_only(pair_run):
    for reg in pair_run.of_type(VS_TYPE):
        host = reg.name.rsplit("-on-", 1)[1]
        waits = {u.rsplit("::", 1)[1] for u in reg.dependencies}
        assert waits == {"nginx"} | {
            f"ingress-bootstrap-on-{host}-{s}"
            for s in ("packages", "kernel-modules", "ip-forward", "keepalived")
        }


def test_one_director_gets_no_keepalived(single_run):
    assert not [r for r in single_run.of_type(COMMAND) if "keepalived" in r.name]


def test_bootstrap_only_where_asked():
    values = pair_config()
    values["directors"][1]["bootstrap"] = True
    run = run_program(values, private_key=PRIVATE_KEY)
    assert {r.name for r in run.of_type(BOOTSTRAP)} == {"ingress-bootstrap-on-203-0-113-3"}


def test_outputs_per_director_and_the_vip_holders(monkeypatch):
    # A holds the IPv4 VIPs; the IPv6 VIP is on B (as a director may report after a failover
    # of one group); one director did not say for one service (an old agent): not listed.
    held = {f"{n}-on-203-0-113-2": True for n in SERVICES}
    held |= {f"{n}-on-203-0-113-3": False for n in SERVICES}
    held["vs-tcp-2001-db8--201-80-on-203-0-113-2"] = False
    held["vs-tcp-2001-db8--201-80-on-203-0-113-3"] = True
    del held["vs-udp-203-0-113-202-5353-on-203-0-113-3"]
    monkeypatch.setattr(conftest, "VIP_HELD", held)
    drained = {
        "address": "203.0.113.12",
        "port": 80.0,
        "state": "drained",
        "since": None,
        "reason": "vip probe: Connection refused",
        "weight": 0.0,
    }
    monkeypatch.setitem(conftest.HEALTH_REPORTS, "vs-tcp-203-0-113-201-80-on-203-0-113-3", [drained])  # fmt: skip
    values = pair_config()
    values["health"] = {"check": "none"}
    values["vips"][0]["health"] = {"check": "vip"}
    out = run_program(values).outputs
    table = [
        "TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1",
        "TCP 203.0.113.201:80 wlc -> 203.0.113.12:80 Route 3",
        "TCP 203.0.113.202:80 rr persistent 60 -> 203.0.113.11:80 Route 1",
        "TCP 203.0.113.202:80 rr persistent 60 -> 203.0.113.12:80 Route 3",
        "UDP 203.0.113.202:5353 rr persistent 60 -> 203.0.113.11:5353 Route 1",
        "UDP 203.0.113.202:5353 rr persistent 60 -> 203.0.113.12:5353 Route 3",
        "TCP [2001:db8::201]:80 wlc -> [2001:db8::11]:80 Route 1",
    ]
    assert out["virtualServices"] == {A: table, B: table}
    assert out["vipHolders"] == {
        "203.0.113.201": [A],
        "203.0.113.202": [A],
        "2001:db8::201": [B],
    }
    assert out["realServerHealth"] == [
        f"{A}: TCP 203.0.113.201:80 -> 203.0.113.11:80 up",
        f"{A}: TCP 203.0.113.201:80 -> 203.0.113.12:80 up",
        f"{B}: TCP 203.0.113.201:80 -> 203.0.113.12:80 drained: vip probe: Connection refused",
    ]


def test_no_holder_reported_is_an_empty_list_per_vip():
    out = run_program(pair_config()).outputs  # the mock director says nothing about the VIP
    assert out["vipHolders"] == {"203.0.113.201": [], "203.0.113.202": [], "2001:db8::201": []}


def test_one_director_has_no_vip_holders_output(single_run):
    assert "vipHolders" not in single_run.outputs
    assert isinstance(single_run.outputs["virtualServices"], list)


def test_directors_on_one_host_by_port_get_their_own_names_and_output_keys():
    # Two directors reached through tunnels on 127.0.0.1 (the lab's way): told apart by port.
    values = pair_config()
    values["directors"][0].update(host="127.0.0.1", port=2201, address=A)
    values["directors"][1].update(host="127.0.0.1", port=2202, address=B)
    run = run_program(values)
    names = {r.name for r in run.of_type(VS_TYPE)}
    assert "vs-tcp-203-0-113-201-80-on-127-0-0-1-2201" in names
    assert "vs-tcp-203-0-113-201-80-on-127-0-0-1-2202" in names
    assert sorted(run.outputs["virtualServices"]) == ["127.0.0.1:2201", "127.0.0.1:2202"]


@pytest.mark.parametrize(
    ("vrrp", "expected"),
    [
        (
            {"advertSeconds": 0.005},
            "ipvs-ingress:vrrp.advertSeconds: 0.005 is not a VRRPv3 advert interval: use seconds from 0.01 to 40.95",  # fmt: skip
        ),
        (
            {"virtualRouterId": 256},
            "ipvs-ingress:vrrp.virtualRouterId: 256 is not a valid VRRP virtual router id",
        ),
        (
            {"preemptDelaySeconds": -1},
            "ipvs-ingress:vrrp.preemptDelaySeconds: -1 is not a valid preempt delay in seconds",
        ),
        (
            {"virtualRouterID": 9},
            "ipvs-ingress:vrrp.virtualRouterID: unknown key 'virtualRouterID': did you mean 'virtualRouterId'?",  # fmt: skip
        ),
        ("fast", "ipvs-ingress:vrrp: 'fast' is not an object: give {virtualRouterId"),
    ],
)
def test_vrrp_settings_problems_stop_the_preview_in_one_line(vrrp, expected):
    run = conftest.Run()
    with pytest.raises(pulumi.RunError) as err:
        run_program(pair_config(vrrp=vrrp), run=run)
    message = str(err.value)
    assert message.startswith(expected) and "\n" not in message
    assert run.of_type(VS_TYPE) == []  # nothing declared


def test_vrrp_without_directors_is_refused_in_one_line():
    values = single_config()
    values["vrrp"] = {"virtualRouterId": 9}
    with pytest.raises(pulumi.RunError) as err:
        run_program(values)
    assert str(err.value).startswith(
        "ipvs-ingress:vrrp: {'virtualRouterId': 9} is set but ipvs-ingress:directors is not"
    )


def test_keepalived_is_installed_after_the_packages_step(pair_run):
    """Both steps run apt-get (or dnf) on the director: run side by side, as the engine runs
    independent resources, one fails on the package manager's lock ("Could not get lock
    /var/lib/dpkg/lock-frontend") on a fresh director."""
    commands = {r.name: r for r in pair_run.of_type(COMMAND)}
    for host in ("203-0-113-2", "203-0-113-3"):
        keepalived = commands[f"ingress-bootstrap-on-{host}-keepalived"]
        waits = {u.rsplit("::", 1)[1] for u in keepalived.dependencies}
        assert f"ingress-bootstrap-on-{host}-packages" in waits, waits
