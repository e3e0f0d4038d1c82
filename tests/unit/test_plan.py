"""The plan and change detection on destinations that differ only by port, address or weight.

Expected plans are written out by hand: a destination is (address, port) in the kernel, so a
node at another port is a different destination that the plan must remove by its own port.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers import model
from tests.unit.test_model import simulate

VIP = "203.0.113.201"


def spec(*servers: tuple[str, int], port: int = 80) -> model.VirtualServiceSpec:
    rs = tuple(model.RealServer(a, w) for a, w in servers)
    return model.VirtualServiceSpec(VIP, port, "tcp", "wlc", 0, rs)


def live(*dests: tuple[str, int, int]) -> model.LiveService:
    return model.LiveService(
        "tcp", VIP, 80, "wlc", 0, tuple(model.LiveDest(a, p, w) for a, p, w in dests)
    )


def test_a_stray_destination_at_another_port_is_deleted_by_its_own_port():
    ops = model.plan(
        live(("203.0.113.11", 80, 1), ("203.0.113.99", 8080, 1)), spec(("203.0.113.11", 1))
    )
    assert ops == [model.Op("del-dest", "203.0.113.99", 8080)]


def test_the_same_address_at_80_and_8080_keeps_80_and_removes_8080():
    current = live(("203.0.113.11", 80, 1), ("203.0.113.11", 8080, 1))
    desired = spec(("203.0.113.11", 1))
    assert model.plan(current, desired) == [model.Op("del-dest", "203.0.113.11", 8080)]
    # Order of the live dump does not matter.
    flipped = live(("203.0.113.11", 8080, 1), ("203.0.113.11", 80, 1))
    assert model.plan(flipped, desired) == [model.Op("del-dest", "203.0.113.11", 8080)]


def test_a_node_only_at_another_port_is_added_at_the_port_before_the_old_one_goes():
    ops = model.plan(live(("203.0.113.11", 8080, 3)), spec(("203.0.113.11", 3)))
    assert ops == [
        model.Op("add-dest", "203.0.113.11", 80, 3),
        model.Op("del-dest", "203.0.113.11", 8080),
    ]


def test_every_op_carries_address_and_port():
    ops = model.plan(None, spec(("203.0.113.11", 2), port=443))
    assert ops == [model.Op("add-service"), model.Op("add-dest", "203.0.113.11", 443, 2)]
    assert ops[1].describe(spec(port=443)) == (
        "add-dest tcp/203.0.113.201:443 -> 203.0.113.11:443 weight 2 Route"
    )
    assert model.Op.from_dict(ops[1].to_dict()) == ops[1]


ports = st.sampled_from([80, 8080, 443])
addresses = st.integers(2, 20).map(lambda i: f"203.0.113.{i}")


@settings(derandomize=True, max_examples=300)
@given(
    st.dictionaries(st.tuples(addresses, ports), st.integers(0, 9), max_size=8),
    st.dictionaries(addresses, st.integers(0, 9), max_size=6),
)
def test_plan_converges_whatever_ports_the_live_destinations_have(old, new):
    current = live(*((a, p, w) for (a, p), w in old.items()))
    desired = spec(*new.items())
    result = simulate(current, desired, model.plan(current, desired))
    assert model.plan(result, desired) == []
    assert sorted((d.address, d.port, d.weight) for d in result.dests) == sorted(
        (a, 80, w) for a, w in new.items()
    )
    # The fewest changes: one per (address, port) that is wrong, missing or stray.
    wrong = {(a, 80) for a, w in new.items() if old.get((a, 80)) != w}
    stray = {k for k in old if k[1] != 80 or k[0] not in new}
    assert len(model.plan(current, desired)) == len(wrong) + len(stray)


# --- change detection: realServers as a set of (address, weight) ---


def _props(*servers: tuple[str, int]) -> dict:
    return {"realServers": [{"address": a, "weight": w} for a, w in servers]}


def test_a_change_of_only_an_address_is_a_change():
    old, new = _props(("203.0.113.11", 1)), _props(("203.0.113.12", 1))
    assert model.changed_keys(old, new) == ["realServers"]


def test_a_change_of_only_a_weight_is_a_change():
    old, new = _props(("203.0.113.11", 1)), _props(("203.0.113.11", 2))
    assert model.changed_keys(old, new) == ["realServers"]


def test_real_server_order_and_a_default_weight_are_not_changes():
    old = _props(("203.0.113.11", 1), ("203.0.113.12", 1))
    new = {"realServers": [{"address": "203.0.113.12"}, {"address": "203.0.113.11", "weight": 1}]}
    assert model.changed_keys(old, new) == []


# --- owner: the stack that declares the service (a plain input, not a replace key) ---

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq"


def _vs(**over) -> dict:
    base = {
        "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
        "vip": VIP,
        "port": 80,
        "realServers": [{"address": "203.0.113.11"}],
    }
    return {**base, **over}


def test_owner_is_carried_round_trip_and_changing_it_is_an_update():
    director, parsed = model.parse_virtual_service(_vs(owner="ipvs-ingress/dev"))
    assert parsed.owner == "ipvs-ingress/dev" and parsed.key == "tcp/203.0.113.201:80"
    props = model.to_props(director, parsed)
    assert props["owner"] == "ipvs-ingress/dev"
    assert model.spec_from_dict(model.spec_to_dict(parsed)) == parsed
    moved = {**props, "owner": "ipvs-ingress/prod"}
    assert model.changed_keys(props, moved) == ["owner"]
    assert "owner" not in model.REPLACE_KEYS


def test_state_from_before_owners_parses_without_one():
    _, parsed = model.parse_virtual_service(_vs())
    assert parsed.owner == "" and "owner" not in model.spec_to_dict(parsed)


@pytest.mark.parametrize("owner", ["", "dev", "a/b/c", "ipvs ingress/dev", "a/dev\n", 7, None])
def test_a_bad_owner_is_one_line_naming_it(owner):
    problems = model.check_virtual_service(_vs(owner=owner))
    assert [p.field for p in problems] == ["owner"]
    assert "<project>/<stack>" in problems[0].message and "\n" not in str(problems[0])


def test_the_dry_run_plans_as_the_stack_its_file_is_named_after():
    from pathlib import Path

    from providers import plan

    assert plan.stack_owner(Path("stacks/Pulumi.prod.yaml")) == "ipvs-ingress/prod"
