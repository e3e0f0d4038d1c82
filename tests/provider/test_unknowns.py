"""Item 7: computed inputs in a preview, through the SDK's gRPC server.

The engine sends an unknown as the sentinel string below inside the Struct; the SDK hands it to
Check and Diff as a `pulumi.output.Unknown` object. Check skips what it cannot see yet; Diff
says "changes" (and "replace" when an identity key is unknown), never a traceback.
"""

from __future__ import annotations

import copy

import pytest

from providers import model
from tests.provider.test_grpc_pure import HOST_KEY

UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"  # the engine's wire value for "unknown"


def full_props() -> dict:
    """Every input property set, so that each one (and each nested one) can be made unknown."""
    props = {
        "director": {
            "host": "203.0.113.2",
            "port": 22,
            "user": "root",
            "hostKey": HOST_KEY,
            "interface": "eth0",
            "proxyCommand": "ssh -W %h:%p bastion.example.net",
        },
        "vip": "203.0.113.201",
        "port": 80,
        "protocol": "tcp",
        "scheduler": "wlc",
        "persistenceSeconds": 0,
        "realServers": [
            {"address": "203.0.113.11", "weight": 1},
            {"address": "203.0.113.12", "weight": 2},
        ],
    }
    if "owner" in model.INPUT_KEYS:  # the stack that owns the service, where the model has it
        props["owner"] = "ipvs-ingress/test"
    if "repair" in model.INPUT_KEYS:  # ipvs-ingress:repair, recorded for the director runtime
        props["repair"] = True
    if "health" in model.INPUT_KEYS:  # issue 9: every key of it, an HTTP GET included
        props["health"] = {
            "check": "vip",
            "intervalSeconds": 1,
            "timeoutSeconds": 0.5,
            "rise": 2,
            "fall": 2,
            "http": {"path": "/healthz", "expectStatus": 200},
            "depoolThreshold": 0.5,
            "kubeProxyPort": 10256,
        }
    if "vrrp" in model.INPUT_KEYS:  # issue 10: a director's part in the VRRP group, every key
        props["vrrp"] = {
            "virtualRouterId": 51,
            "priority": 150,
            "address": "203.0.113.2",
            "peers": ["203.0.113.3"],
            "advertSeconds": 0.1,
            "preemptDelaySeconds": 30,
        }
    return props


def paths(value, prefix=()) -> list[tuple]:
    """Every property path in `value`: ("director",), ("director", "host"), ("realServers", 1) ..."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    out = []
    for key, child in items:
        out.append((*prefix, key))
        if isinstance(child, dict | list):
            out += paths(child, (*prefix, key))
    return out


def with_unknown(path: tuple) -> dict:
    props = copy.deepcopy(full_props())
    target = props
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = UNKNOWN
    return props


# Which replacements an unknown at each path may cause (the rest update in place).
REPLACES = {
    ("director",): ["director.host", "director.port"],
    ("director", "host"): ["director.host"],
    ("director", "port"): ["director.port"],
    ("vip",): ["vip"],
    ("port",): ["port"],
    ("protocol",): ["protocol"],
}
PATHS = paths(full_props())


def test_every_property_is_covered():
    assert (
        len(PATHS)
        == 19
        + ("owner" in model.INPUT_KEYS)
        + ("repair" in model.INPUT_KEYS)
        + 11 * ("health" in model.INPUT_KEYS)  # health, its 8 keys and http's 2
        + 8 * ("vrrp" in model.INPUT_KEYS)  # vrrp, its 6 keys and peers[0]
        and ("realServers", 1, "weight") in PATHS
    )


@pytest.fixture(scope="module")
def old(server):
    inputs, failures = server.check(full_props())
    assert failures == []
    return {**inputs, "ipvsadm": ["TCP 203.0.113.201:80 wlc"], "inSync": True}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: ".".join(map(str, p)))
def test_check_skips_an_unknown_property(server, path):
    news = with_unknown(path)
    inputs, failures = server.check(news)
    assert failures == []
    assert inputs == news  # handed back as it came: the unknown stays unknown


@pytest.mark.parametrize("path", PATHS, ids=lambda p: ".".join(map(str, p)))
def test_diff_with_an_unknown_property_is_a_change(server, old, path):
    resp = server.diff("id", old, with_unknown(path))
    assert resp.changes == resp.DIFF_SOME
    replaces = REPLACES.get(path, [])
    assert list(resp.replaces) == replaces
    # Only a change of director can mean the same service: then the old one goes first.
    assert resp.deleteBeforeReplace == (path[0] == "director" and bool(replaces))


def test_everything_unknown_at_once(server, old):
    news = {k: UNKNOWN for k in full_props()}
    inputs, failures = server.check(news)
    assert (inputs, failures) == (news, [])
    resp = server.diff("id", old, news)
    assert resp.changes == resp.DIFF_SOME
    assert list(resp.replaces) == ["director.host", "director.port", "vip", "port", "protocol"]


def test_known_parts_are_still_checked(server):
    news = with_unknown(("director", "host"))
    news["vip"] = "203.0.113.300"
    _, failures = server.check(news)
    assert [f for f, _ in failures] == ["vip"]


def test_known_identity_in_another_spelling_is_not_a_replacement(server, old):
    news = with_unknown(("realServers", 0, "address"))
    news.update(protocol="TCP", port=80.0, vip="203.0.113.201")
    resp = server.diff("id", old, news)
    assert resp.changes == resp.DIFF_SOME and list(resp.replaces) == []


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("director.example.net", "Director.Example.NET."),
        ("director.example.net", "director.example.net."),
        ("director.example.net.", "DIRECTOR.example.net"),  # state from before canonical hosts
        ("2001:db8::2", "2001:DB8:0::2"),
    ],
)
@pytest.mark.parametrize("unknown", [("scheduler",), ("realServers", 0, "weight")])
def test_a_spelling_only_change_of_director_host_is_no_replace_while_others_are_unknown(
    server, before, after, unknown
):
    # Item 8 in a preview: another input is computed, so the diff cannot normalize both sides.
    olds = full_props()
    olds["director"]["host"] = before
    news = with_unknown(unknown)
    news["director"]["host"] = after
    resp = server.diff("id", {**olds, "ipvsadm": [], "inSync": True}, news)
    assert resp.changes == resp.DIFF_SOME  # the unknown may still change
    assert list(resp.replaces) == [] and not resp.deleteBeforeReplace


def test_another_director_host_is_still_a_replace_while_others_are_unknown(server, old):
    news = with_unknown(("scheduler",))
    news["director"]["host"] = "director-2.example.net."
    resp = server.diff("id", old, news)
    assert list(resp.replaces) == ["director.host"] and resp.deleteBeforeReplace
