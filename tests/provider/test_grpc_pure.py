"""The provider through the SDK's gRPC server, for everything that needs no director:
Configure, Check, Diff, serialization, and one-line errors before any SSH happens."""

from __future__ import annotations

import base64
import subprocess

import grpc
import pytest
from pulumi.dynamic import Config, ConfigureRequest
from pulumi.dynamic.dynamic import serialize_provider

from providers import model
from providers.virtual_service import VirtualServiceProvider
from tests.provider.grpc_client import ProviderServer

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq"
DIRECTOR = model.Director(host="203.0.113.2", host_key=HOST_KEY)


def props(**over) -> dict:
    base = {
        "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
        "owner": "ipvs-ingress/test",  # the owning stack (issue 7 item 5); ignored where unknown
        "vip": "203.0.113.201",
        "port": 80,
        "protocol": "tcp",
        "realServers": [{"address": "203.0.113.11", "weight": 1}, {"address": "203.0.113.12"}],
    }
    base.update(over)
    return base


def test_check_normalizes_defaults_and_float_numbers(server):
    inputs, failures = server.check(props(port=80.0))
    assert failures == []
    assert (
        inputs["port"] == 80 and inputs["scheduler"] == "wlc" and inputs["persistenceSeconds"] == 0
    )
    assert inputs["director"] == {
        "host": "203.0.113.2",
        "port": 22,
        "user": "root",
        "hostKey": HOST_KEY,
        "interface": "eth0",
    }
    assert inputs["realServers"] == [
        {"address": "203.0.113.11", "weight": 1},
        {"address": "203.0.113.12", "weight": 1},
    ]


@pytest.mark.parametrize(
    ("over", "field", "words"),
    [
        ({"port": 80.5}, "port", ["80.5", "1 to 65535"]),
        ({"port": 0}, "port", ["0", "1 to 65535"]),
        ({"protocol": "sctp"}, "protocol", ["'sctp'", "tcp, udp"]),
        ({"scheduler": "fastest"}, "scheduler", ["'fastest'", "wlc"]),
        ({"persistenceSeconds": -1}, "persistenceSeconds", ["-1", "0 to"]),
        ({"vip": "203.0.113.300"}, "vip", ["203.0.113.300", "IPv4 or IPv6"]),
        ({"realServers": []}, "realServers", ["[]", "at least one"]),
        (
            {"realServers": [{"address": "203.0.113.11", "weight": 70000}]},
            "realServers[0].weight",
            ["70000", "0 to 65535"],
        ),  # noqa: E501
        (
            {"realServers": [{"address": "2001:db8::11"}]},
            "realServers[0].address",
            ["IPv6", "VIP is IPv4"],
        ),
        (
            {"realServers": [{"address": "203.0.113.11"}, {"address": "203.0.113.11"}]},
            "realServers[1].address",
            ["repeats realServers[0]", "once"],
        ),
        (
            {"director": {"host": "203.0.113.2", "hostKey": "not a key"}},
            "director.hostKey",
            ["'not a key'", "ssh-keyscan"],
        ),  # noqa: E501
        (
            {"director": {"host": "203.0.113.2", "hostKey": HOST_KEY, "port": 22.5}},
            "director.port",
            ["22.5"],
        ),
    ],
)
def test_check_rejects_bad_input_with_one_line_naming_field_value_and_fix(
    server, over, field, words
):
    _, failures = server.check(props(**over))
    assert [f for f, _ in failures] == [field]
    reason = failures[0][1]
    assert "\n" not in reason
    for word in words:
        assert word in reason
    assert (
        ": use" in reason
        or ": give" in reason
        or ": list" in reason
        or "copy it" in reason
        or "IPv4" in reason
    )


def test_check_accepts_ipv6_and_udp(server):
    inputs, failures = server.check(
        props(
            vip="2001:db8::201",
            protocol="UDP",
            realServers=[{"address": "2001:db8::11", "weight": 3.0}],
        )
    )
    assert failures == []
    assert inputs["protocol"] == "udp" and inputs["realServers"] == [
        {"address": "2001:db8::11", "weight": 3}
    ]


def test_diff_replaces_on_identity_and_updates_in_place_otherwise(server):
    old, _ = server.check(props())
    cases = {
        "vip": (props(vip="203.0.113.202"), ["vip"]),
        "port": (props(port=443), ["port"]),
        "protocol": (props(protocol="udp"), ["protocol"]),
        "director.host": (
            props(director={"host": "203.0.113.3", "hostKey": HOST_KEY}),
            ["director.host"],
        ),
        "director.port": (
            props(director={"host": "203.0.113.2", "hostKey": HOST_KEY, "port": 2222}),
            ["director.port"],
        ),  # noqa: E501
    }
    for name, (new, replaces) in cases.items():
        new_inputs, _ = server.check(new)
        resp = server.diff("id", old, new_inputs)
        assert resp.changes == resp.DIFF_SOME, name
        assert list(resp.replaces) == replaces, name
        # Same service key on a director reached differently: delete first (see provider.diff).
        assert resp.deleteBeforeReplace == name.startswith("director."), name
    for new in (
        props(scheduler="rr"),
        props(persistenceSeconds=300),
        props(realServers=[{"address": "203.0.113.11", "weight": 5}]),
    ):  # noqa: E501
        new_inputs, _ = server.check(new)
        resp = server.diff("id", old, new_inputs)
        assert resp.changes == resp.DIFF_SOME and list(resp.replaces) == []


def test_diff_ignores_real_server_order_and_float_numbers(server):
    old, _ = server.check(props())
    reordered = props(
        port=80.0,
        realServers=[{"address": "203.0.113.12", "weight": 1.0}, {"address": "203.0.113.11"}],
    )
    resp = server.diff("id", {**old, "ipvsadm": ["x"], "inSync": True}, reordered)
    assert resp.changes == resp.DIFF_NONE


def test_diff_repairs_drift_that_refresh_found(server):
    old, _ = server.check(props())
    resp = server.diff("id", {**old, "ipvsadm": [], "inSync": False}, old)
    assert resp.changes == resp.DIFF_SOME and list(resp.replaces) == []


def test_serialized_provider_holds_no_key_material(tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    secret = (tmp_path / "k").read_text()
    provider = VirtualServiceProvider()
    provider.configure(
        ConfigureRequest(Config({"ipvs-ingress:sshPrivateKey": secret}, "ipvs-ingress"))
    )
    assert provider._session(DIRECTOR) is not None  # configured: the key is in this process
    pickled = base64.b64decode(serialize_provider(provider))  # exactly as the SDK pickles it
    assert secret.splitlines()[1].encode() not in pickled and b"PRIVATE KEY" not in pickled
    # By reference, not by value: the code lives in the project, the state holds a small pointer.
    assert b"providers.virtual_service" in pickled and len(pickled) < 2048


def test_operations_without_a_private_key_fail_with_one_line():
    srv = ProviderServer()
    try:
        srv.configure({})
        inputs, _ = srv.check(props())
        with pytest.raises(grpc.RpcError) as err:
            srv.create(inputs, timeout=30)
        assert err.value.details() == (
            "ipvs-ingress:sshPrivateKey is not set, so director 203.0.113.2 cannot be reached: "
            "run 'pulumi config set --secret sshPrivateKey < ~/.ssh/id_ed25519'"
        )
    finally:
        srv.close()


def test_unreachable_director_is_one_line_naming_the_director_and_fix(tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    srv = ProviderServer()
    try:
        srv.configure({"ipvs-ingress:sshPrivateKey": (tmp_path / "k").read_text()})
        # A ProxyCommand that exits at once: the connection dies before the SSH banner.
        director = {"host": "203.0.113.2", "hostKey": HOST_KEY, "proxyCommand": "false"}
        inputs, _ = srv.check(props(director=director))
        with pytest.raises(grpc.RpcError) as err:
            srv.create(inputs, timeout=60)
        msg = err.value.details()
        assert "\n" not in msg and "Traceback" not in msg
        assert msg.startswith("director 203.0.113.2:22 is unreachable")
        assert "director.proxyCommand" in msg
    finally:
        srv.close()


@pytest.mark.parametrize(
    "real_servers",
    [
        # Only one real server's address changes (same weights, same count).
        [{"address": "203.0.113.13", "weight": 1}, {"address": "203.0.113.12", "weight": 1}],
        # Only one real server's weight changes (same addresses).
        [{"address": "203.0.113.11", "weight": 1}, {"address": "203.0.113.12", "weight": 2}],
    ],
    ids=["address-only", "weight-only"],
)
def test_diff_sees_a_change_of_only_an_address_or_only_a_weight(server, real_servers):
    old, _ = server.check(props())
    new, failures = server.check(props(realServers=real_servers))
    assert failures == []
    resp = server.diff("id", {**old, "inSync": True}, new)
    assert resp.changes == resp.DIFF_SOME and list(resp.replaces) == []
