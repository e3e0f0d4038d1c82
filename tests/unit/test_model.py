"""The pure core: validation, normalization, change detection and the desired-vs-live plan."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers import model

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq"


def props(**over):
    base = {
        "director": {"host": "director.example.net", "hostKey": HOST_KEY},
        "vip": "203.0.113.201",
        "port": 80,
        "realServers": [{"address": "203.0.113.11"}],
    }
    return {**base, **over}


# --- validation ---


def test_parse_fills_defaults():
    director, spec = model.parse_virtual_service(props())
    assert director == model.Director(host="director.example.net", host_key=HOST_KEY)
    assert spec == model.VirtualServiceSpec(
        "203.0.113.201", 80, "tcp", "wlc", 0, (model.RealServer("203.0.113.11", 1),)
    )
    assert spec.key == "tcp/203.0.113.201:80"


def test_ipv6_key_is_bracketed_and_address_normalized():
    _, spec = model.parse_virtual_service(
        props(vip="2001:DB8::0:201", realServers=[{"address": "2001:db8::11"}])
    )
    assert spec.vip == "2001:db8::201" and spec.key == "tcp/[2001:db8::201]:80"


def test_known_hosts_line_is_accepted_and_reduced_to_the_key():
    director, _ = model.parse_virtual_service(
        props(director={"host": "203.0.113.2", "hostKey": f"203.0.113.2 {HOST_KEY} root@director"})
    )
    assert director.host_key == HOST_KEY


@pytest.mark.parametrize(
    "key",
    [
        "",
        "ssh-ed25519",
        "ssh-ed25519 !!!notbase64",
        # an RSA key blob labelled as ed25519
        "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    ],
)
def test_bad_host_keys_are_refused(key):
    problems = model.check_virtual_service(props(director={"host": "203.0.113.2", "hostKey": key}))
    assert [p.field for p in problems] == ["director.hostKey"]
    assert "ssh-keyscan" in problems[0].message


def test_missing_director_and_all_problems_reported_together():
    problems = model.check_virtual_service({"vip": "nope", "port": "80", "realServers": "x"})
    assert [p.field for p in problems] == ["director", "vip", "port", "realServers"]
    err = model.InvalidSpec(problems)
    assert str(err).startswith("director: None is not an object") and str(err).endswith(
        "(and 3 more)"
    )


@pytest.mark.parametrize("value", [True, "80", None, 65536, 1.5, float("nan")])
def test_ports_must_be_whole_numbers_in_range(value):
    assert [p.field for p in model.check_virtual_service(props(port=value))] == ["port"]


@given(st.integers(1, 65535))
def test_every_valid_port_passes_as_int_or_float(port):
    assert model.check_virtual_service(props(port=port)) == []
    assert model.check_virtual_service(props(port=float(port))) == []


@pytest.mark.parametrize("vip", ["0.0.0.0", "127.0.0.1", "224.0.0.1", "::", "ff02::1"])
def test_vip_must_be_unicast(vip):
    assert [p.field for p in model.check_virtual_service(props(vip=vip))][0] == "vip"


def test_unknown_values_are_not_judged_during_preview():
    unknown = "??"
    problems = model.check_virtual_service(
        props(vip=unknown, realServers=[unknown]), unknown=lambda v: v == unknown
    )
    assert problems == []


@given(st.text(max_size=30))
def test_arbitrary_scheduler_text_is_either_known_or_refused(name):
    problems = model.check_virtual_service(props(scheduler=name))
    assert (problems == []) == (name.lower() in model.SCHEDULERS)


# --- change detection ---


def test_changed_keys_name_director_fields_and_ignore_real_server_order():
    d, s = model.parse_virtual_service(
        props(realServers=[{"address": "203.0.113.11"}, {"address": "203.0.113.12"}])
    )
    old = model.to_props(d, s)
    new = model.to_props(dataclasses.replace(d, host="203.0.113.3", user="ops"), s)
    new["realServers"] = list(reversed(new["realServers"]))
    assert model.changed_keys(old, new) == ["director.host", "director.user"]


# --- plan ---

addresses = st.integers(2, 250).map(lambda i: f"203.0.113.{i}")
real_servers = st.dictionaries(addresses, st.integers(0, 65535), max_size=8)


def simulate(live: model.LiveService | None, spec: model.VirtualServiceSpec, ops: list[model.Op]):
    """A tiny kernel: apply ops with the kernel's rules (add fails on existing objects); a
    destination is (address, port), and each op names both."""
    dests = {(d.address, d.port): d for d in (live.dests if live else ())}
    svc = live
    for op in ops:
        key = (op.address, op.port)
        if op.action == "add-service":
            assert svc is None, "add of an existing service"
            svc = model.LiveService(
                spec.protocol, spec.vip, spec.port, spec.scheduler, spec.persistence_seconds
            )
        elif op.action == "set-service":
            assert svc is not None
            svc = dataclasses.replace(
                svc, scheduler=spec.scheduler, persistence_seconds=spec.persistence_seconds
            )
        elif op.action == "add-dest":
            assert svc is not None and key not in dests, "add of an existing destination"
            dests[key] = model.LiveDest(op.address, op.port, op.weight)
        elif op.action == "set-dest":
            assert key in dests
            dests[key] = model.LiveDest(op.address, op.port, op.weight)
        elif op.action == "del-dest":
            assert key in dests
            del dests[key]
    return dataclasses.replace(svc, dests=tuple(sorted(dests.values(), key=lambda d: d.address)))


def spec_of(servers: dict, scheduler="wlc", persistence=0):
    rs = tuple(model.RealServer(a, w) for a, w in servers.items())
    return model.VirtualServiceSpec("203.0.113.201", 80, "tcp", scheduler, persistence, rs)


@given(
    real_servers,
    real_servers,
    st.sampled_from(model.SCHEDULERS),
    st.sampled_from(["wlc", "rr"]),
    st.sampled_from([0, 300]),
    st.booleans(),
    st.booleans(),
)
def test_plan_reaches_desired_state_with_the_fewest_changes(
    old, new, sched_old, sched_new, persist, exists, masq
):
    desired = spec_of(new, sched_new, persist)
    live = None
    if exists:
        fwd = 0 if masq else model.ROUTE
        live = model.LiveService(
            "tcp",
            "203.0.113.201",
            80,
            sched_old,
            0,
            tuple(model.LiveDest(a, 80, w, fwd) for a, w in old.items()),
        )
    ops = model.plan(live, desired)
    result = simulate(live, desired, ops)
    assert model.plan(result, desired) == []  # converged
    assert model.ipvsadm_lines(result) == model.ipvsadm_lines(desired)
    if live is not None:
        changed = {
            a for a in set(old) | set(new) if old.get(a) != new.get(a) or (masq and a in new)
        }
        service_change = int((sched_old, 0) != (sched_new, persist))
        assert len(ops) == len(changed) + service_change


def test_a_single_weight_change_touches_one_object():
    live = model.LiveService.from_spec(spec_of({"203.0.113.11": 1, "203.0.113.12": 1}))
    assert model.plan(live, spec_of({"203.0.113.11": 1, "203.0.113.12": 7})) == [
        model.Op("set-dest", "203.0.113.12", 80, 7)
    ]


def test_swap_adds_before_it_removes():
    live = model.LiveService.from_spec(spec_of({"203.0.113.11": 1}))
    ops = model.plan(live, spec_of({"203.0.113.12": 1}))
    assert [o.action for o in ops] == ["add-dest", "del-dest"]


def test_ipvsadm_lines_format():
    spec = model.VirtualServiceSpec(
        "2001:db8::201",
        443,
        "udp",
        "sh",
        300,
        (model.RealServer("2001:db8::12", 2), model.RealServer("2001:db8::11")),
    )
    assert model.ipvsadm_lines(spec) == [
        "UDP [2001:db8::201]:443 sh persistent 300 -> [2001:db8::11]:443 Route 1",
        "UDP [2001:db8::201]:443 sh persistent 300 -> [2001:db8::12]:443 Route 2",
    ]
    assert model.ipvsadm_lines(spec_of({"203.0.113.11": 1})) == [
        "TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1"
    ]


def test_live_and_spec_round_trip_through_json_dicts():
    spec = spec_of({"203.0.113.11": 3})
    assert model.spec_from_dict(model.spec_to_dict(spec)) == spec
    live = model.LiveService.from_spec(spec)
    assert model.LiveService.from_dict(live.to_dict()) == live
    op = model.Op("set-dest", "203.0.113.11", 80, 3)
    assert model.Op.from_dict(op.to_dict()) == op
