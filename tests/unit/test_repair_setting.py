"""Issue 8, the repair setting and read's desired state, on the in-memory kernel of
test_agent_logic: the agent records a request's `repair` per service (a record change only,
write-ahead), read and apply replies carry the recorded desired table, and the director runtime
repairs a service only when its record says so and runtime.json does not turn its stack off.

Expected tables, records and lines are written out literally, never computed with the model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import pytest

from providers import agent, ownership, runtime
from tests.unit.test_agent_logic import OWNER, MemoryKernel, spec
from tests.unit.test_agent_logic import kernel as kernel  # noqa: F401 (the fixture)
from tests.unit.test_runtime import make_runtime

VIP = "203.0.113.201"
KEY = f"tcp/{VIP}:80"
OTHER = "team-b/prod"
TABLE = [("203.0.113.11", 80, 1, 3), ("203.0.113.12", 80, 1, 3)]  # (address, port, weight, fwd)
DESIRED = [
    f"TCP {VIP}:80 wlc -> 203.0.113.11:80 Route 1",
    f"TCP {VIP}:80 wlc -> 203.0.113.12:80 Route 1",
]


def request(op="apply", adopt=True, **kw) -> dict:
    """An apply (or plan) as the provider sends it; `repair` only when given (an old provider)."""
    repair = {"repair": kw.pop("repair")} if "repair" in kw else {}
    doc = {"op": op, "spec": spec(**kw), "interface": "eth0", "adopt": adopt, **repair}
    return json.loads(json.dumps(doc))


def handle(kernel, doc: dict) -> dict:
    return json.loads(json.dumps(agent.Agent(kernel).handle(doc)))


def read(kernel, owner=OWNER) -> dict:
    doc = {"op": "read", "protocol": "tcp", "vip": VIP, "port": 80, "interface": "eth0"}
    return handle(kernel, doc | {"owner": owner, "adopt": True})


def entry() -> dict:
    with open(ownership.STATE_PATH) as f:
        return json.load(f)["services"][KEY]


def drop_first_dest(kernel) -> None:
    """Out of band, as `ipvsadm -d -t VIP:80 -r 203.0.113.11:80` would."""
    svc = kernel.services[("tcp", VIP, 80)]
    kept = tuple(d for d in svc.dests if d.address != "203.0.113.11")
    kernel.services[("tcp", VIP, 80)] = dataclasses.replace(svc, dests=kept)


# --- the agent: recording repair ---------------------------------------------------------------


def test_apply_records_repair_and_an_old_provider_means_on(kernel):
    handle(kernel, request(adopt=False))  # no repair field: a provider from before it
    assert entry()["repair"] is True
    handle(kernel, request(repair=False))
    assert entry()["repair"] is False and entry()["state"] == "applied"


@pytest.mark.parametrize("turn", [False, True])
def test_a_change_of_repair_alone_changes_the_record_and_no_kernel_object(
    kernel, turn, monkeypatch
):
    handle(kernel, request(adopt=False, repair=not turn))
    kernel.changes.clear()
    saves = []
    real_save = agent.Ownership.save

    def save(self):  # write-ahead: pending with the new setting first, then applied
        saves.append((self.services[KEY]["state"], self.services[KEY]["repair"]))
        real_save(self)

    monkeypatch.setattr(agent.Ownership, "save", save)
    result = handle(kernel, request(repair=turn))
    assert kernel.changes == [] and result["touched"] == 0 and result["changes"] == []
    assert saves == [("pending", turn), ("applied", turn)]
    assert entry()["repair"] is turn and kernel.table() == TABLE
    assert (result["repair"], result["desired"], result["recordState"]) == (
        turn,
        DESIRED,
        "applied",
    )
    saves.clear()
    again = handle(kernel, request(repair=turn))  # settled: nothing written at all
    assert saves == [] and again["touched"] == 0 and kernel.changes == []


def test_plan_names_a_repair_change_and_changes_nothing(kernel):
    handle(kernel, request(adopt=False))
    before = json.dumps(entry())
    planned = handle(kernel, request(op="plan", repair=False))
    assert planned["changes"] == ["record repair off (no kernel change)"]
    assert json.dumps(entry()) == before and entry()["repair"] is True
    assert handle(kernel, request(op="plan", repair=True))["changes"] == []


@pytest.mark.parametrize("bad", ["false", 0, None, [], {"on": True}])
def test_a_repair_that_is_not_a_boolean_is_refused_before_anything(kernel, bad):
    handle(kernel, request(adopt=False, repair=False))
    drop_first_dest(kernel)
    kernel.changes.clear()
    with pytest.raises(agent.AgentError) as err:
        handle(kernel, request(repair=bad))
    assert err.value.code == "bad-request" and str(err.value).startswith("repair: ")
    assert kernel.changes == [] and entry()["repair"] is False


@pytest.mark.parametrize("bad", ["no", 0, None, [True]])
def test_a_record_whose_repair_is_not_a_boolean_is_corrupt(kernel, bad):
    handle(kernel, request(adopt=False))
    with open(ownership.STATE_PATH) as f:
        data = json.load(f)
    data["services"][KEY]["repair"] = bad
    with open(ownership.STATE_PATH, "w") as f:
        json.dump(data, f)
    with pytest.raises(agent.AgentError) as err:
        read(kernel)
    assert err.value.code == "corrupt-state"


def test_a_refresh_that_re_adopts_keeps_the_recorded_repair(kernel):
    handle(kernel, request(adopt=False, repair=False))
    with open(ownership.STATE_PATH) as f:
        data = json.load(f)
    data["services"][KEY].pop("owner")  # a record from before owners: read claims it
    with open(ownership.STATE_PATH, "w") as f:
        json.dump(data, f)
    assert read(kernel)["owned"] is True
    assert entry()["owner"] == OWNER and entry()["repair"] is False


# --- the agent: read returns the desired state -------------------------------------------------


def test_read_returns_the_recorded_desired_table_next_to_the_live_one(kernel):
    handle(kernel, request(adopt=False, repair=False))
    drop_first_dest(kernel)
    result = read(kernel)
    assert result["desired"] == DESIRED  # the record, not the kernel
    assert [(d["address"], d["weight"]) for d in result["live"]["dests"]] == [("203.0.113.12", 1)]
    assert (result["repair"], result["recordState"]) == (False, "applied")


def test_read_of_an_unrecorded_service_desires_nothing(kernel):
    result = read(kernel)  # nothing anywhere
    assert (result["live"], result["desired"], result["recordState"]) == (None, [], None)
    handle(kernel, request(adopt=False))
    os.unlink(ownership.STATE_PATH)  # the record is lost: read re-adopts, with no spec
    result = read(kernel)
    assert result["owned"] is True and result["desired"] == [] and result["repair"] is True


# --- the runtime: the record's repair and the operator's override ------------------------------


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "STATE_PATH", str(tmp_path / "state.json"))
    monkeypatch.setattr(ownership, "LOCK_PATH", str(tmp_path / "run" / "lock"))
    return tmp_path


def stacks_line(kernel, rt) -> str:
    out = io.StringIO()
    runtime.print_status(kernel, status_path=rt.status_path, config_path=rt.config_path, out=out)
    (line,) = [x for x in out.getvalue().splitlines() if x.startswith("stacks: ")]
    return line


REPAIRED = [f"repaired {KEY}: add-dest 203.0.113.11:80 weight 1"]
OFF_BY_STACK = f"left {KEY} ({OWNER}): repair is off for stack {OWNER} (its config ipvs-ingress:repair is false)"  # fmt: skip


def test_a_record_with_repair_off_keeps_its_drift_and_turning_it_on_repairs(paths):
    kernel = MemoryKernel()
    handle(kernel, request(adopt=False, repair=False))
    rt = make_runtime(kernel, paths)
    drop_first_dest(kernel)
    assert rt.reconcile() == [] and kernel.table() == TABLE[1:]
    assert OFF_BY_STACK in rt.logged
    status = rt.status()["services"][KEY]
    assert (status["kept"], status["repair"], status["inSync"]) == (False, False, False)
    assert stacks_line(kernel, rt) == f"stacks: {OWNER} (repair off: ipvs-ingress:repair false)"
    handle(kernel, request(repair=True))  # `pulumi up` with repair on: converges, records it
    assert kernel.table() == TABLE and entry()["repair"] is True
    drop_first_dest(kernel)
    assert rt.reconcile() == REPAIRED and kernel.table() == TABLE
    assert stacks_line(kernel, rt) == f"stacks: {OWNER} (repair on)"


def test_turning_repair_off_by_apply_alone_stops_the_repairs(paths):
    kernel = MemoryKernel()
    handle(kernel, request(adopt=False, repair=True))
    rt = make_runtime(kernel, paths)
    drop_first_dest(kernel)
    assert rt.reconcile() == REPAIRED
    kernel.changes.clear()
    handle(kernel, request(repair=False))  # the stack config turned off: the record only
    assert kernel.changes == []
    drop_first_dest(kernel)
    assert rt.reconcile() == [] and kernel.table() == TABLE[1:]


def test_the_operators_override_turns_a_stack_off_but_never_on(paths):
    kernel = MemoryKernel()
    handle(kernel, request(adopt=False, repair=True))
    handle(kernel, request(adopt=False, repair=False, vip="203.0.113.202", owner=OTHER))
    config = {"repair": {OWNER: False, OTHER: True}}
    rt = make_runtime(kernel, paths, config=config)
    drop_first_dest(kernel)
    other = kernel.services.pop(("tcp", "203.0.113.202", 80))
    assert rt.reconcile() == []  # OWNER: off on the director; OTHER: off in its stack config
    assert ("tcp", "203.0.113.202", 80) not in kernel.services and other is not None
    assert f"left {KEY} ({OWNER}): repair is off for stack {OWNER}" in rt.logged
    assert stacks_line(kernel, rt) == (
        f"stacks: {OWNER} (repair off: {paths / 'runtime.json'}), "
        f"{OTHER} (repair off: ipvs-ingress:repair false)"
    )
    (paths / "runtime.json").write_text(json.dumps({"intervalSeconds": 2}))  # override gone
    assert rt.reconcile() == REPAIRED  # OWNER again; OTHER still off by its own config
    assert ("tcp", "203.0.113.202", 80) not in kernel.services


def test_at_boot_a_stack_with_repair_off_is_restored_all_the_same(paths):
    kernel = MemoryKernel()
    handle(kernel, request(adopt=False, repair=False))
    kernel.services.clear()
    kernel.addresses.clear()
    rt = make_runtime(kernel, paths, restoring=True)
    assert rt.reconcile()[0] == f"restored {KEY}: add-service wlc"
    assert kernel.table() == TABLE and kernel.addresses == {(2, VIP)}
    drop_first_dest(kernel)  # after the boot pass: off again
    assert rt.reconcile() == [] and kernel.table() == TABLE[1:]


def test_status_counts_a_stack_half_way_through_turning_repair_off(paths):
    kernel = MemoryKernel()
    handle(kernel, request(adopt=False, repair=True))
    handle(kernel, request(adopt=False, repair=False, port=443))
    rt = make_runtime(kernel, paths)
    rt.reconcile()
    expected = f"stacks: {OWNER} (repair off for 1 of 2 services: ipvs-ingress:repair false)"
    assert stacks_line(kernel, rt) == expected


def test_the_dry_run_plans_with_the_stack_files_repair(kernel, monkeypatch):
    import yaml

    from providers import plan

    sent = []

    class Session:
        def request(self, op, **fields):
            sent.append(fields["repair"])
            return handle(kernel, json.loads(json.dumps({"op": op, **fields})))

        def close(self):
            pass

    def session(_director, _key, install):
        assert install is False  # a dry run installs nothing on the director
        return Session()

    monkeypatch.setattr(plan, "RuntimeSession", session)
    with open(Path(__file__).parents[2] / "stacks" / "Pulumi.dev.yaml") as f:
        stack = yaml.safe_load(f)["config"]  # 203.0.113.201:80 -> .11 and .12, weight 1: spec()
    # Recorded as `pulumi up` of this stack records it: with the default health check (issue 9).
    default_health = {
        "check": "vip", "intervalSeconds": 1.0, "timeoutSeconds": 0.5, "rise": 2, "fall": 2,
        "depoolThreshold": 0.5, "kubeProxyPort": 10256,
    }  # fmt: skip
    handle(kernel, request(adopt=False, repair=True) | {"health": default_health})
    assert plan.plan_stack(stack, "unused", OWNER) == [(KEY, [])]
    off = plan.plan_stack({**stack, "ipvs-ingress:repair": False}, "unused", OWNER)
    assert off == [(KEY, ["record repair off (no kernel change)"])]
    assert sent == [True, False] and entry()["repair"] is True  # a dry run records nothing
