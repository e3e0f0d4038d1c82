"""Validation in the pure core (providers/model.py): what check accepts, in which spelling, and
the one-line reason for everything it refuses (issue 7 items 8-11)."""

from __future__ import annotations

import base64
import struct
import subprocess

import pytest

from providers import model

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq"


def props(director=None, **over):
    base = {
        "director": {"host": "203.0.113.2", "hostKey": HOST_KEY, **(director or {})},
        "vip": "203.0.113.201",
        "port": 80,
        "realServers": [{"address": "203.0.113.11"}],
    }
    return {**base, **over}


def problems_of(p) -> list[model.Problem]:
    found = model.check_virtual_service(p)
    for problem in found:
        text = str(problem)
        assert "\n" not in text and len(text) <= 300, text
    return found


def fields(p) -> list[str]:
    return [x.field for x in problems_of(p)]


# --- director.host: one spelling (item 8), strictly an address or a DNS name (items 9, 11) ---


@pytest.mark.parametrize(
    ("host", "canonical"),
    [
        ("203.0.113.2", "203.0.113.2"),
        ("2001:db8::2", "2001:db8::2"),
        ("2001:DB8:0::2", "2001:db8::2"),
        ("2001:0db8:0000:0000:0000:0000:0000:0002", "2001:db8::2"),
        ("director.example.net", "director.example.net"),
        ("Director.Example.NET", "director.example.net"),
        ("director.example.net.", "director.example.net"),
        ("director", "director"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_director_host_is_accepted_in_its_canonical_spelling(host, canonical):
    director, problems = model.check_director({"host": host, "hostKey": HOST_KEY})
    assert problems == []
    assert director.host == canonical
    assert (
        model.to_props(*model.parse_virtual_service(props({"host": host})))["director"]["host"]
        == canonical
    )


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("2001:db8::2%eth0", "zone id"),
        ("fe80::1%eth0", "zone id"),
        ("fe80::1%x;touch${IFS}marker;true", "zone id"),
        ("203.0.113.2%eth0", "zone id"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "cannot be reached"),
        ("ff02::1", "cannot be reached"),
        ("203.0.113.300", "neither an IP address nor a DNS name"),
        ("010.0.0.2", "neither an IP address nor a DNS name"),
        ("0x7f000001", "neither an IP address nor a DNS name"),
        ("127.1", "neither an IP address nor a DNS name"),
        ("4294967295", "neither an IP address nor a DNS name"),
        ("director.example.net\n", "not a host name"),
        ("director.example.net ", "not a host name"),
        (" director.example.net", "not a host name"),
        ("director.example.net\x00", "not a host name"),
        ("dir ector", "not a host name"),
        ("-director.example.net", "not a host name"),
        ("director..example.net", "not a host name"),
        ("bastion;touch marker", "not a host name"),
        ("$(touch marker)", "not a host name"),
        ("dïrector.example.net", "not a host name"),
        ("a" * 64 + ".example.net", "not a host name"),
        (".".join(["a" * 63] * 4) + ".net", "neither"),  # 260 characters: longer than DNS allows
        ("", "not a host name"),
        (None, "not a host name"),
        (2130706433, "not a host name"),
        (["203.0.113.2"], "not a host name"),
    ],
)
def test_director_host_that_is_not_strictly_an_address_or_a_name_is_refused(host, words):
    found = problems_of(props({"host": host}))
    assert [p.field for p in found] == ["director.host"]
    assert words in found[0].message
    assert found[0].message.startswith(model._short(host))


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("255.255.255.255", "the broadcast address"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:203.0.113.2", "IPv4-mapped"),
        ("240.0.0.1", "reserved"),
        ("0.1.2.3", "0.0.0.0/8"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
    ],
)
def test_director_host_that_cannot_be_an_ssh_peer_is_refused_with_the_reason(host, reason):
    found = problems_of(props({"host": host}))
    assert [p.field for p in found] == ["director.host"]
    message = found[0].message
    assert message.startswith(f"{host!r} cannot be reached over SSH (") and reason in message
    assert message.endswith("give the director's own address or DNS name")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1"])
def test_loopback_director_host_is_kept_for_tunnels(host):
    # `ssh -L 2222:director:22 bastion` then host 127.0.0.1 port 2222, or pulumi on the director.
    director, found = model.check_director({"host": host, "hostKey": HOST_KEY, "port": 2222})
    assert found == [] and (director.host, director.port) == (host, 2222)


def test_director_host_echo_is_capped():
    found = problems_of(props({"host": "a" * 1_000_000}))
    assert [p.field for p in found] == ["director.host"]
    assert len(str(found[0])) < 200


# --- addresses: zone ids, and addresses that cannot be served (item 9) ---


@pytest.mark.parametrize(
    ("vip", "reason"),
    [
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.1.2.3", "0.0.0.0/8"),
        ("::ffff:203.0.113.201", "IPv4-mapped"),
        ("0.0.0.0", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
    ],
)
def test_vip_that_cannot_be_served_is_refused_with_the_reason(vip, reason):
    rs = "2001:db8::11" if ":" in vip else "203.0.113.11"
    found = problems_of(props(vip=vip, realServers=[{"address": rs}]))
    assert [p.field for p in found] == ["vip"]
    assert reason in found[0].message and "use a unicast address" in found[0].message


@pytest.mark.parametrize(
    "address", ["255.255.255.255", "240.0.0.1", "169.254.1.1", "0.0.0.9", "127.0.0.2"]
)
def test_real_server_that_cannot_be_served_is_refused(address):
    found = problems_of(props(realServers=[{"address": "203.0.113.11"}, {"address": address}]))
    assert [p.field for p in found] == ["realServers[1].address"]
    assert "cannot be a real server" in found[0].message


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"vip": "2001:db8::201%eth0"}, "vip"),
        ({"realServers": [{"address": "2001:db8::11%eth1"}]}, "realServers[0].address"),
        (
            {"realServers": [{"address": "2001:db8::11"}, {"address": "2001:db8::11%eth1"}]},
            "realServers[1].address",
        ),
    ],
)
def test_ipv6_zone_ids_are_refused_everywhere(over, field):
    p = props(**{"vip": "2001:db8::201", "realServers": [{"address": "2001:db8::11"}], **over})
    found = problems_of(p)
    assert [x.field for x in found] == [field]
    assert "has a zone id" in found[0].message and "without %<zone>" in found[0].message


def test_global_ipv6_vip_and_real_servers_pass():
    _, spec = model.parse_virtual_service(
        props(vip="2001:DB8::201", realServers=[{"address": "2001:db8:0::11"}])
    )
    assert (spec.vip, spec.real_servers[0].address) == ("2001:db8::201", "2001:db8::11")


# --- names: no whitespace, no control characters, no trailing newline (item 9) ---


@pytest.mark.parametrize(
    "user", ["root\n", "ro ot", "root\t", "ro\x00ot", "", "-oProxyCommand=x", "a;b", "ü", None, 0]
)
def test_bad_user_is_refused(user):
    found = problems_of(props({"user": user}))
    assert [p.field for p in found] == ["director.user"]
    assert "set the SSH login user" in found[0].message


@pytest.mark.parametrize(
    "iface", ["eth0\n", "eth 0", "eth0\t", "eth0:1", "a/b", ".", "..", "", "x" * 16, "eth0\x7f"]
)
def test_bad_interface_is_refused(iface):
    assert fields(props({"interface": iface})) == ["director.interface"]


@pytest.mark.parametrize("proxy", ["ssh -W %h:%p jump\nrm -rf /", "ssh\x00jump", "", "   "])
def test_bad_proxy_command_is_refused(proxy):
    assert fields(props({"proxyCommand": proxy})) == ["director.proxyCommand"]


@pytest.mark.parametrize(
    ("proxy", "words"),
    [
        ("ssh '" + "x" * 1_000_000, "characters long"),  # would reach create, echoed whole
        ("ssh -W %h:%p " + "b" * 1100, "characters long"),
        ("ssh -W %h:%p 'bastion", "balance its quotes"),
        ('ssh -W %h:%p "bastion', "balance its quotes"),
        ("ssh -W %h:%p bastion\\", "balance its quotes"),  # a final backslash escapes nothing
        ("'' %h %p", "names no program"),
        ("ssh -W %h:%p\tbastion", "control character"),
    ],
)
def test_proxy_command_that_cannot_be_split_is_refused_at_preview(proxy, words):
    found = problems_of(props({"proxyCommand": proxy}))
    assert [p.field for p in found] == ["director.proxyCommand"]
    assert words in found[0].message and "ssh -W %h:%p bastion" in found[0].message
    assert found[0].message.startswith(model._short(proxy)) and len(str(found[0])) < 250


@pytest.mark.parametrize(
    "proxy",
    [
        "ssh -W %h:%p bastion.example.net",
        "ssh -W '[%h]:%p' -p 2222 ops@bastion",
        "sh -c 'exec nc %h %p'",
        "ssh " + "b" * 1000,  # long, within the cap
    ],
)
def test_proxy_commands_that_split_into_words_pass(proxy):
    director, found = model.check_director({"host": "203.0.113.2", "hostKey": HOST_KEY, "proxyCommand": proxy})  # fmt: skip
    assert found == [] and director.proxy_command == proxy


def test_configured_user_interface_and_port_are_kept():
    director, _ = model.parse_virtual_service(
        props({"user": "ops-deploy", "interface": "ens3.100", "port": 2222.0})
    )
    assert (director.user, director.interface, director.port) == ("ops-deploy", "ens3.100", 2222)
    assert model.to_props(director, model.parse_virtual_service(props())[1])["director"] == {
        "host": "203.0.113.2",
        "port": 2222,
        "user": "ops-deploy",
        "hostKey": HOST_KEY,
        "interface": "ens3.100",
    }


@pytest.mark.parametrize("user", ["root", "ops", "svc.deploy", "user@corp.example", "host$", "_x"])
def test_usual_user_names_pass(user):
    assert problems_of(props({"user": user})) == []


# --- the SSH port's bounds (mutation gap) ---


@pytest.mark.parametrize(("port", "ok"), [(0, False), (1, True), (65535, True), (65536, False)])
def test_ssh_port_bounds(port, ok):
    assert fields(props({"port": port})) == ([] if ok else ["director.port"])
    assert fields(props({"port": float(port)})) == ([] if ok else ["director.port"])


# --- host keys: the key material itself, not only its type string (item 9) ---


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def key_line(kind: str, *fields: bytes) -> str:
    return f"{kind} {base64.b64encode(b''.join(ssh_string(f) for f in fields)).decode()}"


RSA_N = b"\x00" + b"\xc5" * 256  # a positive 2048-bit modulus
P256 = b"\x04" + b"\x11" * 64


@pytest.mark.parametrize(
    "key",
    [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",  # the type string alone
        key_line("ssh-ed25519", b"ssh-ed25519"),
        key_line("ssh-ed25519", b"ssh-ed25519", b"\x01" * 31),
        key_line("ssh-ed25519", b"ssh-ed25519", b"\x01" * 33),
        key_line("ssh-ed25519", b"ssh-ed25519", b"\x01" * 32, b"extra"),
        key_line("ssh-ed25519", b"ssh-ed25519", b"\x01" * 32) + "AAAA",
        # a length prefix that promises more than is there
        "ssh-ed25519 "
        + base64.b64encode(ssh_string(b"ssh-ed25519") + b"\x00\x00\x00\x20ab").decode(),
        key_line("ssh-rsa", b"ssh-rsa", b"\x01\x00\x01"),
        key_line("ssh-rsa", b"ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xc5" * 64),  # 512 bits
        key_line("ssh-rsa", b"ssh-rsa", b"\x81", RSA_N),  # a negative exponent
        key_line("ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp256", b"nistp256"),
        key_line("ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp256", b"nistp384", P256),
        key_line("ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp256", b"nistp256", P256[:-1]),
        key_line("ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp256", b"nistp256", b"\x02" + P256[1:]),
        f"{HOST_KEY}\n{HOST_KEY}",  # two lines: which one is pinned?
        f"{HOST_KEY}\x00",
    ],
)
def test_host_key_without_complete_key_material_is_refused(key):
    found = problems_of(props({"hostKey": key}))
    assert [p.field for p in found] == ["director.hostKey"]
    assert "is not a pinned host key" in found[0].message and "ssh-keyscan" in found[0].message


@pytest.mark.parametrize(
    "key",
    [
        HOST_KEY,
        f"{HOST_KEY} root@director\n",
        key_line("ssh-rsa", b"ssh-rsa", b"\x01\x00\x01", RSA_N),
        key_line("ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp256", b"nistp256", P256),
    ],
)
def test_complete_host_keys_pass(key):
    director, problems = model.check_director({"host": "203.0.113.2", "hostKey": key})
    assert problems == []
    assert director.host_key == " ".join(key.split()[:2])


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
def test_keys_from_ssh_keygen_pass(tmp_path, kind):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    line = (tmp_path / "k.pub").read_text()
    assert model.parse_host_key(line)[0] == line.split()[0]


# --- numbers: one rule, and no overflow (items 9, 10) ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (80, 80),
        (80.0, 80),
        (80.5, None),
        (True, None),
        (False, None),
        pytest.param(10**400, None, id="10**400"),
        pytest.param(-(10**400), None, id="-10**400"),
        pytest.param(
            10**5000, None, id="10**5000"
        ),  # beyond str()'s digit limit: must not even be printed whole
        (float("inf"), None),
        (float("-inf"), None),
        (float("nan"), None),
        ("80", None),
        (None, None),
    ],
)
def test_whole_number(value, expected):
    assert model.whole_number(value, 1, 65535) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(10**400, id="10**400"),
        pytest.param(10**5000, id="10**5000"),
        *(float("inf"), float("nan"), 1e300, True),
    ],
)
@pytest.mark.parametrize(
    ("where", "field"),
    [
        (lambda v: props(port=v), "port"),
        (lambda v: props(persistenceSeconds=v), "persistenceSeconds"),
        (lambda v: props(realServers=[{"address": "203.0.113.11", "weight": v}]), "realServers[0].weight"),
        (lambda v: props({"port": v}), "director.port"),
    ],
)  # fmt: skip
def test_huge_and_non_finite_numbers_are_one_short_line(where, field, value):
    found = problems_of(where(value))
    assert [p.field for p in found] == [field]
    assert "use a whole number from" in found[0].message
    assert len(str(found[0])) < 200


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"protocol": "x" * 1_000_000}, "protocol"),
        ({"scheduler": "x" * 1_000_000}, "scheduler"),
        ({"vip": "2001:db8::1%" + "x" * 1_000_000}, "vip"),
        ({"vip": "9" * 1_000_000}, "vip"),
        ({"realServers": "x" * 1_000_000}, "realServers"),
        ({"realServers": [["x" * 1_000_000]]}, "realServers[0]"),
        ({"director": "x" * 1_000_000}, "director"),
        ({"director": {"host": "203.0.113.2", "hostKey": "x" * 1_000_000}}, "director.hostKey"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_megabyte_value_gives_a_reason_of_bounded_size(over, field):
    found = problems_of({**props(), **over})
    assert [p.field for p in found] == [field]
    assert len(str(found[0])) <= 300
