"""Issue 7 items 2-6 on the in-memory kernel: what read reports, write-ahead records, lost and
corrupt state files, per-stack ownership and kernel refusals. Expected tables are written out."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from providers import agent, model, ownership
from tests.unit.test_agent_logic import OWNER, Crash, apply, delete, read, spec
from tests.unit.test_agent_logic import kernel as kernel  # noqa: F401 (the fixture)

KEY = "tcp/203.0.113.201:80"
TWO = [("203.0.113.11", 80, 1, 3), ("203.0.113.12", 80, 1, 3)]


def record() -> dict:
    """The state file as it is on disk."""
    with open(ownership.STATE_PATH) as f:
        return json.load(f)


def fresh(kernel):
    """A new agent process after a kill: the kill switch off."""
    kernel.crash_after = None


@pytest.fixture(autouse=True)
def saves_are_steps(kernel, monkeypatch):
    """A state write is a step the "kill" can come before, like a kernel change."""
    save = agent.Ownership.save

    def counted(self):
        kernel.step("save")
        save(self)

    monkeypatch.setattr(agent.Ownership, "save", counted)


# --- item 2: read reports the VIP binding and ip_forward ---


def test_read_reports_ownership_vip_binding_and_forwarding(kernel):
    apply(kernel)
    assert read(kernel) | {"live": None} == {
        "live": None,
        "owned": True,
        "owner": OWNER,
        "vipBound": True,
        "ipForward": True,
        # What the record holds (item 3 of issue 8): refresh shows it next to the live table.
        "desired": [
            "TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1",
            "TCP 203.0.113.201:80 wlc -> 203.0.113.12:80 Route 1",
        ],
        "repair": True,
        "recordState": "applied",
        "vrrp": None,  # one director: the VIP is this director's to bind (issue 10)
    }
    kernel.addresses.clear()
    kernel.forwarding = False
    result = read(kernel)
    assert (result["vipBound"], result["ipForward"], result["owned"]) == (False, False, True)
    assert read(kernel, interface="eth9")["vipBound"] is False  # no such NIC: nothing bound


def test_a_read_loads_no_module_and_without_ip_vs_the_service_is_absent(kernel):
    apply(kernel)
    kernel.services.clear()  # the director rebooted: ip_vs is not loaded, so no service
    kernel.loaded = False
    kernel.changes.clear()
    result = read(kernel)
    assert (result["live"], result["owned"], result["vipBound"]) == (None, False, True)
    assert kernel.changes == [] and kernel.loaded is False  # no modprobe


def test_update_after_an_unbound_vip_and_ip_forward_off_rebinds_and_sets_it(kernel):
    apply(kernel)
    kernel.addresses.clear()
    kernel.forwarding = False
    kernel.changes.clear()
    result = apply(kernel, adopt=True)
    assert kernel.changes == ["forward", "bind 203.0.113.201@2"]
    assert (result["vipBound"], result["ipForward"], result["touched"]) == (True, True, 1)


def test_read_of_a_service_that_is_not_ours_says_so(kernel):
    kernel.services[("tcp", "203.0.113.201", 80)] = model.LiveService(
        "tcp", "203.0.113.201", 80, "rr", 0
    )
    assert read(kernel, owner=OWNER)["owned"] is True  # adopt: the stack's state holds it
    assert read(kernel, owner="ipvs-ingress/prod") == {
        **read(kernel, owner="ipvs-ingress/prod"),
        "owned": False,
        "owner": OWNER,
    }


# --- item 3: write-ahead ---


def test_intent_is_on_disk_before_the_first_kernel_change(kernel):
    kernel.crash_after = 1  # killed right after the first state write
    with pytest.raises(Crash):
        apply(kernel)
    assert kernel.changes == [] and kernel.services == {}
    entry = record()["services"][KEY]
    assert (entry["owner"], entry["state"], entry["spec"]) == (OWNER, "pending", spec())


def test_a_create_killed_after_its_first_kernel_change_converges_on_the_next_apply(kernel):
    kernel.crash_after = 3  # intent written, ip_forward set, service added: then kill -9
    with pytest.raises(Crash):
        apply(kernel)
    assert kernel.table() == []  # a half-made service, no destination yet
    fresh(kernel)
    apply(kernel)  # the next `pulumi up` creates it again: not refused as foreign
    assert kernel.table() == TWO and kernel.addresses == {(2, "203.0.113.201")}
    assert record()["services"][KEY]["state"] == "applied"


# --- item 4: state.json lost or corrupt ---


def test_a_lost_state_file_is_readopted_by_read_update_and_delete(kernel, tmp_path):
    apply(kernel, port=80)
    apply(kernel, port=443)
    for _ in range(2):
        (tmp_path / "state.json").unlink()
        assert read(kernel)["owned"] is True
        assert record()["services"][KEY]["owner"] == OWNER
        assert record()["addresses"] == {}  # bound, but nothing says by whom: never claimed
    (tmp_path / "state.json").unlink()
    with pytest.raises(agent.AgentError) as err:  # a create: no stack holds it yet
        apply(kernel)
    assert err.value.code == "foreign" and "ipvsadm -D" in str(err.value)
    apply(kernel, adopt=True, servers=[("203.0.113.11", 4)])  # an update: adopted
    assert kernel.table() == [("203.0.113.11", 80, 4, 3)]
    assert delete(kernel, port=443) == {"deleted": True, "removedVip": False}
    assert ("tcp", "203.0.113.201", 443) not in kernel.services
    assert delete(kernel, port=80) == {"deleted": True, "removedVip": False}
    assert kernel.services == {} and kernel.addresses == {(2, "203.0.113.201")}


def test_readoption_never_claims_a_vip_someone_else_bound(kernel, tmp_path):
    kernel.addresses.add((2, "203.0.113.201"))  # keepalived's VIP
    apply(kernel, port=80)
    apply(kernel, port=443)
    assert record()["addresses"] == {} and kernel.changes.count("bind 203.0.113.201@2") == 0
    (tmp_path / "state.json").unlink()  # lost: now nothing tells keepalived's VIP from ours
    assert read(kernel, port=80)["owned"] is True  # refresh re-adopts
    apply(kernel, port=443, adopt=True, servers=[("203.0.113.11", 2)])  # up re-adopts
    assert record()["addresses"] == {}
    assert delete(kernel, port=80)["removedVip"] is False
    assert delete(kernel, port=443)["removedVip"] is False
    assert kernel.services == {} and kernel.addresses == {(2, "203.0.113.201")}


@pytest.mark.parametrize(
    "text, what",
    [
        ('{"services": {', "is not valid JSON"),
        ("\xff\xfe", "is not valid JSON"),
        ("[]", "is not an ipvs-ingress record"),
        ('{"services": []}', "is not an ipvs-ingress record"),
        ('{"services": {"tcp/203.0.113.201:80": 5}}', "is not an ipvs-ingress record"),
        ('{"addresses": {"203.0.113.201": {"iface": "eth0"}}}', "is not an ipvs-ingress record"),
        # JSON of the right overall shape, but not what the agent wrote: keys it splits, fields
        # it compares or hands to the kernel.
        *[
            (
                json.dumps({"services": {key: {"vip": vip, **extra}}}),
                "is not an ipvs-ingress record",
            )
            for key, vip, extra in [
                ("garbage-key", "203.0.113.201", {}),
                ("tcp/203.0.113.201", "203.0.113.201", {}),
                ("sctp/203.0.113.201:80", "203.0.113.201", {}),
                ("tcp/203.0.113.201:0", "203.0.113.201", {}),
                ("tcp/203.0.113.201:080", "203.0.113.201", {}),
                ("tcp/203.0.113.201:70000", "203.0.113.201", {}),
                ("tcp/2001:db8::1:80", "2001:db8::1", {}),  # IPv6 without brackets
                ("tcp/[2001:DB8::1]:80", "2001:DB8::1", {}),  # not as the agent writes it
                ("tcp/203.0.113.202:80", "203.0.113.201", {}),  # the key names another VIP
                ("tcp/203.0.113.201:80", "203.0.113.201", {"owner": 7}),
                ("tcp/203.0.113.201:80", "203.0.113.201", {"state": "done"}),
                ("tcp/203.0.113.201:80", "203.0.113.201", {"spec": []}),
                ("tcp/203.0.113.201:80", "203.0.113.201", {"interface": ["eth0"]}),
            ]
        ],
        ('{"addresses": {"eth0": {"interface": "eth0"}}}', "is not an ipvs-ingress record"),
        ('{"addresses": {"None": {"interface": "eth0"}}}', "is not an ipvs-ingress record"),
    ],
)
def test_a_corrupt_state_file_is_named_with_the_fix_and_nothing_changes(
    kernel, tmp_path, text, what
):
    apply(kernel)
    before = (dict(kernel.services), set(kernel.addresses))
    path = tmp_path / "state.json"
    path.write_text(text, encoding="latin-1")
    kernel.changes.clear()
    calls = [
        lambda: apply(kernel, servers=[("203.0.113.13", 1)]),
        lambda: agent.Agent(kernel).handle({"op": "plan", "spec": spec(), "interface": "eth0"}),
        lambda: read(kernel),
        lambda: delete(kernel),
    ]
    for call in calls:
        with pytest.raises(agent.AgentError) as err:
            call()
        msg = str(err.value)
        assert err.value.code == "corrupt-state" and "\n" not in msg
        assert len(msg.replace(str(path), "")) < 200
        assert msg.startswith(f"{path} {what}") and f"mv {path} {path}.bad" in msg
        assert msg.endswith("then pulumi refresh re-adopts this stack's services")
    assert (dict(kernel.services), set(kernel.addresses)) == before and kernel.changes == []
    assert path.read_text(encoding="latin-1") == text


# --- item 5: ownership per stack ---


def test_another_stacks_apply_on_the_same_vip_port_is_refused_naming_the_owner(kernel):
    apply(kernel, owner="ipvs-ingress/dev")
    kernel.changes.clear()
    for adopt in (False, True):
        with pytest.raises(agent.AgentError) as err:
            apply(kernel, owner="ipvs-ingress/prod", adopt=adopt, servers=[("203.0.113.13", 1)])
        assert err.value.code == "owned" and "stack ipvs-ingress/dev" in str(err.value)
    assert kernel.changes == [] and kernel.table() == TWO


def test_a_destroy_never_touches_another_stacks_service(kernel):
    apply(kernel, owner="ipvs-ingress/dev")
    kernel.changes.clear()
    with pytest.raises(agent.AgentError) as err:  # refused, not a silent success
        delete(kernel, owner="ipvs-ingress/prod")
    assert str(err.value) == (
        "vip: tcp/203.0.113.201:80 belongs to stack ipvs-ingress/dev on this director, not to"
        " ipvs-ingress/prod: nothing was deleted; if this stack should not hold it,"
        " pulumi state delete its URN"
    )
    assert (
        kernel.changes == []
        and kernel.table() == TWO
        and kernel.addresses == {(2, "203.0.113.201")}
    )
    assert record()["services"][KEY]["owner"] == "ipvs-ingress/dev"


def test_a_renamed_stack_keeps_its_service_and_the_record_follows_the_new_name(kernel):
    apply(kernel, owner="ipvs-ingress/dev")
    kernel.changes.clear()
    # `pulumi stack rename dev dev2`, then up: an update whose olds still name dev.
    request = {"op": "apply", "spec": spec(owner="ipvs-ingress/dev2"), "interface": "eth0"}
    request |= {"adopt": True, "formerOwner": "ipvs-ingress/dev"}
    agent.Agent(kernel).handle(request)
    assert kernel.changes == [] and kernel.table() == TWO  # a rename changes no kernel state
    entry = record()["services"][KEY]
    assert (entry["owner"], entry["formerOwner"]) == ("ipvs-ingress/dev2", "ipvs-ingress/dev")
    assert read(kernel, owner="ipvs-ingress/dev2")["owned"] is True
    # The reply was lost: the stack's state still says dev. Its refresh still finds it.
    assert read(kernel, owner="ipvs-ingress/dev")["owned"] is True
    with pytest.raises(agent.AgentError) as err:  # never taken over by a create
        apply(kernel, owner="ipvs-ingress/dev")
    assert "belongs to stack ipvs-ingress/dev2" in str(err.value)
    assert delete(kernel, owner="ipvs-ingress/dev2") == {"deleted": True, "removedVip": True}
    assert kernel.services == {} and kernel.addresses == set() and record()["services"] == {}


def test_a_vip_shared_by_two_stacks_stays_bound_until_the_last_goes(kernel):
    apply(kernel, port=80, owner="ipvs-ingress/dev")
    apply(kernel, port=443, owner="ipvs-ingress/prod")
    assert delete(kernel, port=80, owner="ipvs-ingress/dev") == {
        "deleted": True,
        "removedVip": False,
    }
    assert kernel.addresses == {(2, "203.0.113.201")}
    assert delete(kernel, port=443, owner="ipvs-ingress/prod") == {
        "deleted": True,
        "removedVip": True,
    }
    assert kernel.addresses == set() and kernel.services == {}


def test_a_malformed_record_is_refused_before_a_delete_changes_anything(kernel, tmp_path):
    path = tmp_path / "state.json"
    text = json.dumps(
        {
            "services": {"garbage-key": {"vip": "203.0.113.201"}},
            "addresses": {"203.0.113.201": {"interface": "eth0"}},
        }
    )
    path.write_text(text)
    for call in (lambda: apply(kernel, port=81), lambda: delete(kernel, port=81)):
        with pytest.raises(agent.AgentError) as err:
            call()
        assert err.value.code == "corrupt-state"
        assert str(err.value).startswith(f"{path} is not an ipvs-ingress record: nothing was")
    assert kernel.changes == [] and kernel.services == {} and path.read_text() == text


def test_the_deleted_record_reaches_the_disk(kernel):
    apply(kernel)
    delete(kernel)
    assert record() == {"services": {}, "addresses": {}}


def test_a_stale_record_of_another_stack_does_not_block_a_free_vip_port(kernel):
    apply(kernel, owner="ipvs-ingress/dev")
    kernel.services.clear()  # flushed by hand; dev's refresh dropped it from its state
    apply(kernel, owner="ipvs-ingress/prod")
    assert kernel.table() == TWO and record()["services"][KEY]["owner"] == "ipvs-ingress/prod"


def test_records_of_the_old_format_are_adopted(kernel, tmp_path):
    apply(kernel, port=80)
    apply(kernel, port=443)
    old = {
        "services": {
            KEY: {"vip": "203.0.113.201", "interface": "eth0"},
            "tcp/203.0.113.201:443": {"vip": "203.0.113.201", "interface": "eth0"},
        },
        "addresses": {"203.0.113.201": {"interface": "eth0"}},
    }
    (tmp_path / "state.json").write_text(json.dumps(old))
    kernel.changes.clear()
    for port in (80, 443):  # a create: nothing says which stack holds it, so never taken
        with pytest.raises(agent.AgentError) as err:
            apply(kernel, port=port, owner="ipvs-ingress/prod")
        assert err.value.code == "owned" and "run pulumi refresh in the stack" in str(err.value)
    assert kernel.changes == [] and record() == old
    assert read(kernel, port=80)["owned"] is True  # a refresh: it carries the resource's id
    apply(kernel, port=443, adopt=True, servers=[("203.0.113.11", 1)])  # an update: the same
    services = record()["services"]
    assert services[KEY]["owner"] == services["tcp/203.0.113.201:443"]["owner"] == OWNER
    with pytest.raises(agent.AgentError) as err:
        apply(kernel, owner="ipvs-ingress/prod")
    assert err.value.code == "owned"


# --- item 6: kernel refusals ---


@pytest.mark.parametrize(
    "address, which", [("203.0.113.255", "broadcast"), ("203.0.113.0", "network")]
)
def test_a_network_or_broadcast_real_server_is_refused_before_any_change(kernel, address, which):
    with pytest.raises(agent.AgentError) as err:
        apply(kernel, servers=[("203.0.113.11", 1), (address, 1)])
    assert str(err.value) == (
        f"realServers[1].address: {address} is the {which} address of 203.0.113.0/24 on eth0,"
        " not a node: list the nodes' own addresses"
    )
    assert kernel.changes == [] and kernel.services == {}


def test_a_kernel_refusal_is_one_line_and_a_failed_create_leaves_nothing(kernel):
    # 198.51.100.255 is a broadcast address of eth1's prefix: the kernel says EINVAL.
    with pytest.raises(agent.AgentError) as err:
        apply(kernel, servers=[("203.0.113.11", 1), ("198.51.100.255", 1)])
    assert str(err.value) == (
        "realServers: 198.51.100.255: the kernel refused add-dest tcp/203.0.113.201:80 ->"
        " 198.51.100.255:80 (Invalid argument): list the nodes' own unicast addresses"
    )
    assert kernel.services == {} and kernel.addresses == set()
    assert KEY not in record()["services"]
    apply(kernel)
    assert kernel.table() == TWO


def test_a_refused_update_stays_this_stacks_and_the_next_apply_converges(kernel):
    apply(kernel)
    with pytest.raises(agent.AgentError):
        apply(kernel, adopt=True, servers=[("203.0.113.13", 2), ("198.51.100.255", 1)])
    assert record()["services"][KEY]["owner"] == OWNER
    apply(kernel, adopt=True, servers=[("203.0.113.13", 2)])
    assert kernel.table() == [("203.0.113.13", 80, 2, 3)]


class NetlinkError(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def netlink_kernel(code):
    """The real Kernel adapter over a netlink stand-in that refuses everything with `code`."""

    def refuse(*_args, **_kw):
        raise NetlinkError(code)

    k = object.__new__(agent.Kernel)
    k.NetlinkError = NetlinkError
    k._apply = refuse
    k.ipr = type("IPRoute", (), {"addr": staticmethod(refuse)})()
    return k


def test_the_kernel_adapter_maps_netlink_refusals_to_one_line():
    vs = model.spec_from_dict(spec())
    with pytest.raises(agent.AgentError) as err:
        netlink_kernel(22).apply(vs, model.Op("add-dest", "203.0.113.11", 80, 1))
    assert str(err.value).startswith("realServers: 203.0.113.11: the kernel refused add-dest")
    with pytest.raises(agent.AgentError) as err:
        netlink_kernel(2).apply(vs, model.Op("add-service"))
    assert err.value.code == "no-scheduler" and "ip_vs_wlc" in str(err.value)
    with pytest.raises(agent.AgentError) as err:
        netlink_kernel(1).add_address(2, "203.0.113.201")
    assert str(err.value) == (
        "vip: 203.0.113.201: the kernel refused to bind it on interface 2"
        " (Operation not permitted): check director.interface"
    )


# --- the record is read fresh under the lock ---


def test_a_record_rewritten_in_place_with_the_same_size_and_mtime_is_read_fresh(kernel):
    apply(kernel, port=80, owner="team-a/prod")
    apply(kernel, port=443, owner="team-b/prod")
    # Another agent process: B moved its service from :443 to :444. Written in place (same inode),
    # the same length, within one tick of a coarse mtime: (inode, mtime, size) all unchanged.
    path = ownership.STATE_PATH
    before = os.stat(path)
    with open(path, "r+") as f:
        text = f.read()
        moved = text.replace(":443", ":444").replace('"port":443', '"port":444')
        assert len(moved) == len(text) and moved != text
        f.seek(0)
        f.write(moved)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    svc = kernel.services.pop(("tcp", "203.0.113.201", 443))
    kernel.services[("tcp", "203.0.113.201", 444)] = dataclasses.replace(svc, port=444)
    apply(kernel, port=81, owner="team-a/prod")  # A's next apply saves the whole record
    services = record()["services"]
    assert set(services) == {KEY, "tcp/203.0.113.201:444", "tcp/203.0.113.201:81"}
    assert services["tcp/203.0.113.201:444"]["owner"] == "team-b/prod"
