"""Issue 9 groundwork, director side, on the in-memory kernel of test_agent_logic: the agent
records a request's `health` per service (write-ahead, a change of it alone is a record change
with no kernel object touched), refuses a bad one in one line before anything, replies with the
recorded one, and a state.json whose health is malformed is refused as corrupt.

Expected records and lines are written out literally, never computed with the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from providers import agent, ownership
from tests.program.conftest import TCP_HEALTH
from tests.unit.test_agent_logic import OWNER, MemoryKernel, spec
from tests.unit.test_agent_logic import kernel as kernel  # noqa: F401 (the fixture)

VIP = "203.0.113.201"
KEY = f"tcp/{VIP}:80"
TABLE = [("203.0.113.11", 80, 1, 3), ("203.0.113.12", 80, 1, 3)]
DEFAULTS = TCP_HEALTH  # the contract's defaults, written out once (tests/program/conftest.py)
HTTP = {**DEFAULTS, "rise": 3, "http": {"path": "/healthz", "expectStatus": 204}}


def request(op="apply", adopt=True, health=None, **kw) -> dict:
    """An apply (or plan) as the provider sends it; `health` only when given (an old provider,
    or a service with none)."""
    doc = {"op": op, "spec": spec(**kw), "interface": "eth0", "adopt": adopt}
    if health is not None:
        doc["health"] = health
    return json.loads(json.dumps(doc))


def handle(kernel, doc: dict) -> dict:
    return json.loads(json.dumps(agent.Agent(kernel).handle(doc)))


def read(kernel) -> dict:
    doc = {"op": "read", "protocol": "tcp", "vip": VIP, "port": 80, "interface": "eth0"}
    return handle(kernel, doc | {"owner": OWNER, "adopt": True})


def entry() -> dict:
    with open(ownership.STATE_PATH) as f:
        return json.load(f)["services"][KEY]


def rewrite(change) -> None:
    with open(ownership.STATE_PATH) as f:
        data = json.load(f)
    change(data["services"][KEY])
    with open(ownership.STATE_PATH, "w") as f:
        json.dump(data, f)


def test_apply_records_health_and_none_is_no_field(kernel):
    result = handle(kernel, request(adopt=False))  # no health: a provider from before it
    assert "health" not in entry() and "health" not in result
    result = handle(kernel, request(health=HTTP))
    assert entry()["health"] == HTTP and result["health"] == HTTP
    assert entry()["state"] == "applied" and kernel.table() == TABLE
    assert read(kernel)["health"] == HTTP


def test_apply_records_the_normalized_form(kernel):
    # As gRPC delivers numbers (floats) and with keys left to their defaults.
    handle(kernel, request(adopt=False, health={"rise": 3.0, "intervalSeconds": 2, "http": None}))
    assert entry()["health"] == {**DEFAULTS, "rise": 3, "intervalSeconds": 2.0}
    assert type(entry()["health"]["rise"]) is int


@pytest.mark.parametrize(("old", "new"), [(None, DEFAULTS), (DEFAULTS, HTTP), (HTTP, None)])
def test_a_change_of_health_alone_changes_the_record_and_no_kernel_object(
    kernel, old, new, monkeypatch
):
    handle(kernel, request(adopt=False, health=old))
    kernel.changes.clear()
    saves = []
    real_save = agent.Ownership.save

    def save(self):  # write-ahead: pending with the new setting first, then applied
        saves.append((self.services[KEY]["state"], self.services[KEY].get("health")))
        real_save(self)

    monkeypatch.setattr(agent.Ownership, "save", save)
    result = handle(kernel, request(health=new))
    assert kernel.changes == [] and result["touched"] == 0 and result["changes"] == []
    assert saves == [("pending", new), ("applied", new)]
    assert entry().get("health") == new and kernel.table() == TABLE
    saves.clear()
    again = handle(kernel, request(health=new))  # settled: nothing written at all
    assert saves == [] and again["touched"] == 0 and kernel.changes == []


def test_plan_names_a_health_change_and_changes_nothing(kernel):
    handle(kernel, request(adopt=False, health=DEFAULTS))
    before = json.dumps(entry())
    planned = handle(kernel, request(op="plan", health=HTTP))
    assert planned["changes"] == [
        "record health vip GET /healthz every 1s, rise 3 fall 2 (no kernel change)"
    ]
    off = handle(kernel, request(op="plan"))
    assert off["changes"] == ["record health none (no kernel change)"]
    none = handle(kernel, request(op="plan", health={**DEFAULTS, "check": "none"}))
    assert none["changes"] == ["record health none (no kernel change)"]
    slower = handle(kernel, request(op="plan", health={**DEFAULTS, "intervalSeconds": 2.5}))
    assert slower["changes"] == ["record health vip every 2.5s, rise 2 fall 2 (no kernel change)"]
    assert json.dumps(entry()) == before
    assert handle(kernel, request(op="plan", health=DEFAULTS))["changes"] == []


@pytest.mark.parametrize(
    ("bad", "start"),
    [
        ({"rise": 0}, "health.rise: 0 is not a valid count"),
        ({"check": "vip "}, "health.check: 'vip ' is not a health check"),
        (
            {"intervalSeconds": 1, "timeoutSeconds": 2},
            "health.timeoutSeconds: 2 is not a probe timeout",
        ),  # fmt: skip
        ({"http": {"path": "/a b"}}, "health.http.path: '/a b' is not a request path"),
        ({"check": "none", "http": {}}, "health.http: {} is set but check is 'none'"),
        ({"bogus": 1, "fall": 11}, "health.bogus: unknown key 'bogus'"),
        ("vip", "health: 'vip' is not an object"),
    ],
)
def test_a_bad_health_is_refused_in_one_line_before_anything(kernel, bad, start):
    handle(kernel, request(adopt=False, health=DEFAULTS))
    kernel.changes.clear()
    with pytest.raises(agent.AgentError) as err:
        handle(kernel, request(health=bad, servers=(("203.0.113.13", 1),)))
    text = str(err.value)
    assert err.value.code == "bad-request" and text.startswith(start), text
    assert "\n" not in text and len(text) < 300
    assert kernel.changes == [] and entry()["health"] == DEFAULTS


def test_vip_on_a_udp_service_is_refused(kernel):
    doc = request(adopt=False, health={"check": "vip"})
    doc["spec"]["protocol"] = "udp"
    with pytest.raises(agent.AgentError) as err:
        handle(kernel, doc)
    assert str(err.value).startswith("health.check: 'vip' cannot check a udp port")
    assert kernel.changes == []


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "vip",
        [],
        {**DEFAULTS, "rise": 0},
        {**DEFAULTS, "rise": True},
        {**DEFAULTS, "bogus": 1},
        {k: v for k, v in DEFAULTS.items() if k != "fall"},  # not the form record() writes
        {**DEFAULTS, "check": "kubeproxy"},
    ],
)
def test_a_record_whose_health_is_malformed_is_corrupt(kernel, bad):
    handle(kernel, request(adopt=False, health=DEFAULTS))
    rewrite(lambda e: e.__setitem__("health", bad))
    with pytest.raises(agent.AgentError) as err:
        read(kernel)
    assert err.value.code == "corrupt-state"


def test_a_recorded_vip_check_on_a_udp_key_is_corrupt(kernel):
    handle(kernel, request(adopt=False, health=DEFAULTS))
    with open(ownership.STATE_PATH) as f:
        data = json.load(f)
    data["services"][f"udp/{VIP}:80"] = data["services"][KEY] | {"health": DEFAULTS}
    with open(ownership.STATE_PATH, "w") as f:
        json.dump(data, f)
    with pytest.raises(agent.AgentError) as err:
        read(kernel)
    assert err.value.code == "corrupt-state"


def test_a_refresh_that_re_adopts_keeps_the_recorded_health(kernel):
    handle(kernel, request(adopt=False, health=HTTP))
    rewrite(lambda e: e.pop("owner"))  # a record from before owners: read claims it
    assert read(kernel)["owned"] is True
    assert entry()["owner"] == OWNER and entry()["health"] == HTTP


def test_the_dry_run_plans_with_the_stack_files_health(kernel, monkeypatch):
    import yaml

    from providers import plan

    sent = []

    class Session:
        def request(self, op, **fields):
            sent.append(fields.get("health"))
            return handle(kernel, json.loads(json.dumps({"op": op, **fields})))

        def close(self):
            pass

    monkeypatch.setattr(plan, "RuntimeSession", lambda _d, _k, install: Session())
    with open(Path(__file__).parents[2] / "stacks" / "Pulumi.dev.yaml") as f:
        stack = yaml.safe_load(f)["config"]  # 203.0.113.201:80 -> .11 and .12, weight 1: spec()
    handle(kernel, request(adopt=False, health=DEFAULTS))
    assert plan.plan_stack(stack, "unused", OWNER) == [(KEY, [])]
    custom = {**stack, "ipvs-ingress:health": {"rise": 3, "http": {"path": "/healthz", "expectStatus": 204}}}  # fmt: skip
    assert plan.plan_stack(custom, "unused", OWNER) == [
        (KEY, ["record health vip GET /healthz every 1s, rise 3 fall 2 (no kernel change)"])
    ]
    assert sent == [DEFAULTS, HTTP] and entry()["health"] == DEFAULTS  # nothing recorded


def test_a_fresh_kernel_without_a_record_is_unchanged_by_health(tmp_path, monkeypatch):
    """The runtime's records of other stacks with no health stay valid (absent = none)."""
    monkeypatch.setattr(ownership, "STATE_PATH", str(tmp_path / "state.json"))
    monkeypatch.setattr(ownership, "LOCK_PATH", str(tmp_path / "lock"))
    kernel = MemoryKernel()
    handle(kernel, request(adopt=False))
    handle(kernel, request(adopt=False, port=443, health=DEFAULTS))
    assert ownership.Ownership.load().services[f"tcp/{VIP}:443"]["health"] == DEFAULTS
    assert "health" not in ownership.Ownership.load().services[KEY]
