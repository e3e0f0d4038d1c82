"""Validation as the engine sees it, through the SDK's gRPC server: director.host has one
spelling (issue 7 item 8), and hostile values fail check with one short line (items 9, 10)."""

from __future__ import annotations

import pytest

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq"


def props(host: str = "203.0.113.2", **over) -> dict:
    base = {
        "director": {"host": host, "hostKey": HOST_KEY},
        "vip": "2001:db8::201",
        "port": 80,
        "protocol": "tcp",
        "realServers": [{"address": "2001:db8::11", "weight": 1}],
        "owner": "ipvs-ingress/dev",
    }
    return {**base, **over}


@pytest.mark.parametrize(
    ("before", "after", "canonical"),
    [
        ("2001:db8::2", "2001:DB8:0::2", "2001:db8::2"),
        ("2001:db8::2", "2001:0db8:0000:0000:0000:0000:0000:0002", "2001:db8::2"),
        ("director.example.net", "Director.Example.NET", "director.example.net"),
        ("director.example.net", "director.example.net.", "director.example.net"),
    ],
)
def test_a_spelling_only_change_of_director_host_is_no_change(server, before, after, canonical):
    old, failures = server.check(props(before))
    assert failures == []
    new, failures = server.check(props(after))
    assert failures == []
    assert old["director"]["host"] == new["director"]["host"] == canonical
    resp = server.diff("id", {**old, "ipvsadm": [], "inSync": True}, new)
    assert resp.changes == resp.DIFF_NONE
    assert list(resp.replaces) == [] and not resp.deleteBeforeReplace
    # State written before hosts were canonical holds the old spelling: still no change.
    stale = {**old, "director": {**old["director"], "host": after}, "inSync": True}
    resp = server.diff("id", stale, new)
    assert resp.changes == resp.DIFF_NONE and list(resp.replaces) == []


def test_another_ipv6_director_is_still_a_replace(server):
    old, _ = server.check(props("2001:db8::2"))
    new, _ = server.check(props("2001:db8::3"))
    resp = server.diff("id", old, new)
    assert resp.changes == resp.DIFF_SOME
    assert list(resp.replaces) == ["director.host"] and resp.deleteBeforeReplace


@pytest.mark.parametrize(
    ("over", "field"),
    [
        # inf and nan cannot cross the wire (protobuf's JSON refuses them); the largest can.
        ({"port": 1.7976931348623157e308}, "port"),
        ({"port": -1e300}, "port"),
        ({"persistenceSeconds": 1e300}, "persistenceSeconds"),
        ({"realServers": [{"address": "2001:db8::11", "weight": 1e300}]}, "realServers[0].weight"),
        ({"vip": "2001:db8::201%eth0"}, "vip"),
        ({"vip": "fe80::1"}, "vip"),
        ({"director": {"host": "fe80::1%x;touch${IFS}marker;true", "hostKey": HOST_KEY}}, "director.host"),
        ({"director": {"host": "169.254.1.1", "hostKey": HOST_KEY}}, "director.host"),
        ({"director": {"host": "::ffff:203.0.113.2", "hostKey": HOST_KEY}}, "director.host"),
        ({"director": {"host": "203.0.113.2", "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"}}, "director.hostKey"),
        ({"director": {"host": "203.0.113.2", "hostKey": HOST_KEY, "port": 1e300}}, "director.port"),
        ({"director": {"host": "203.0.113.2", "hostKey": HOST_KEY, "user": "root\n"}}, "director.user"),
        ({"protocol": "x" * 1_000_000}, "protocol"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)  # fmt: skip
def test_hostile_values_fail_check_with_one_short_line(server, over, field):
    _, failures = server.check(props(**over))
    assert [f for f, _ in failures] == [field]
    reason = failures[0][1]
    assert "\n" not in reason and len(reason) <= 300 and "Traceback" not in reason
