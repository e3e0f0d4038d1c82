"""ipvs-ingress:directors (issue 10): two or more directors, each a director plus its VRRP
priority and its own address on the director segment; checked at preview, one line per problem,
exposed as cfg.directors. The single ipvs-ingress:director works as before."""

from __future__ import annotations

import copy

import pytest

from components.config import ConfigError, DirectorConfig, load
from providers.model import Director
from tests.program.conftest import HOST_KEY

PINNED = " ".join(HOST_KEY.split()[:2])
BASE = {
    "vips": [{"address": "203.0.113.201", "ports": [{"port": 80}]}],
    "realServers": [{"address": "203.0.113.11"}],
}
SINGLE = {**BASE, "director": {"host": "203.0.113.2", "hostKey": HOST_KEY}}
PAIR = {
    **BASE,
    "directors": [
        {"host": "203.0.113.2", "hostKey": HOST_KEY, "priority": 150},
        {"host": "203.0.113.3", "hostKey": HOST_KEY, "priority": 100, "interface": "ens3"},
    ],
}


def changed(base, change) -> dict:
    values = copy.deepcopy(base)
    change(values)
    return values


def refused(values) -> str:
    with pytest.raises(ConfigError) as err:
        load(values)
    text = str(err.value)
    assert "\n" not in text and len(text) <= 300, text
    return text


def test_a_single_director_is_a_one_element_list_without_vrrp():
    cfg = load(SINGLE)
    assert cfg.directors == (DirectorConfig(Director("203.0.113.2", PINNED), False),)
    assert cfg.director == Director("203.0.113.2", PINNED) and not cfg.vrrp


def test_a_pair_is_parsed_in_order_with_priorities_and_addresses():
    cfg = load(PAIR)
    assert cfg.vrrp
    assert cfg.directors == (
        DirectorConfig(Director("203.0.113.2", PINNED), False, 150, "203.0.113.2"),
        DirectorConfig(
            Director("203.0.113.3", PINNED, interface="ens3"), False, 100, "203.0.113.3"
        ),
    )
    assert cfg.director == cfg.directors[0].director  # the first one (the plan CLI uses it)
    assert [s.key for s in cfg.virtual_services] == ["tcp/203.0.113.201:80"]


def test_an_address_is_given_where_the_host_is_a_name_or_a_tunnel_and_bootstrap_is_per_director():
    values = changed(PAIR, lambda v: v["directors"][0].update(host="lb-a.example.net", address="203.0.113.2"))  # fmt: skip
    values["directors"][1].update(host="127.0.0.1", port=2201, address="2001:DB8::3")
    values["directors"][0]["address"] = "2001:db8::2"
    values["vips"].append({"address": "2001:db8::201", "ports": [{"port": 80}]})
    values["realServers"].append({"address": "2001:db8::11"})
    values["directors"][1]["bootstrap"] = True
    cfg = load(values)
    assert [(d.director.host, d.address, d.bootstrap) for d in cfg.directors] == [
        ("lb-a.example.net", "2001:db8::2", False),
        ("127.0.0.1", "2001:db8::3", True),
    ]
    assert cfg.bootstrap is True  # some director is prepared by Pulumi: the key is needed


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda v: v.update(director=SINGLE["director"]),
            "ipvs-ingress:directors: is set together with ipvs-ingress:director: give one director as ipvs-ingress:director or two or more as ipvs-ingress:directors, not both",  # fmt: skip
        ),
        (
            lambda v: v["directors"].pop(),
            "ipvs-ingress:directors: [{'host': '203.0.113.2', 'hostKey': '... has 1 director: VIP ownership by VRRP needs at least 2",  # fmt: skip
        ),
        (
            lambda v: v.update(directors={"host": "203.0.113.2"}),
            "ipvs-ingress:directors: {'host': '203.0.113.2'} is not a list of directors",
        ),
        (
            lambda v: v["directors"][1].pop("priority"),
            "ipvs-ingress:directors[1].priority: not set: give each director a VRRP priority",
        ),
        (
            lambda v: v["directors"][1].update(priority=255),
            "ipvs-ingress:directors[1].priority: 255 is not a VRRP priority: use a whole number from 1 to 254",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(priority=0),
            "ipvs-ingress:directors[1].priority: 0 is not a VRRP priority",
        ),
        (
            lambda v: v["directors"][1].update(priority=150.0),
            "ipvs-ingress:directors[1].priority: 150 repeats ipvs-ingress:directors[0].priority: give each director its own",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(priority=True),
            "ipvs-ingress:directors[1].priority: True is not a VRRP priority",
        ),
        (
            lambda v: v["directors"][1].update(host="203.0.113.2"),
            "ipvs-ingress:directors[1].host: '203.0.113.2' repeats ipvs-ingress:directors[0] (same host and port): list each director once",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(host="lb-b.example.net"),
            "ipvs-ingress:directors[1].address: not set, and host 'lb-b.example.net' is a DNS name: give the director's own IP address",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(host="127.0.0.1"),
            "ipvs-ingress:directors[1].address: not set, and host '127.0.0.1' is a loopback address (a tunnel)",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(address="203.0.113.2"),
            "ipvs-ingress:directors[1].address: 203.0.113.2 repeats ipvs-ingress:directors[0]'s address",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(address="2001:db8::3"),
            "ipvs-ingress:directors[1].address: 2001:db8::3 is IPv6 but ipvs-ingress:directors[0] is IPv4",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(address="lb-b"),
            "ipvs-ingress:directors[1].address: 'lb-b' cannot be a director's address (not an IP address)",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(address="224.0.0.18"),
            "ipvs-ingress:directors[1].address: '224.0.0.18' cannot be a director's address (a multicast address)",  # fmt: skip
        ),
        (
            lambda v: v["directors"][1].update(prority=100),
            "ipvs-ingress:directors[1].prority: unknown key 'prority': did you mean 'priority'?",
        ),
        (
            lambda v: v["directors"][1].update(interface="eth0\n"),
            "ipvs-ingress:directors[1].interface: 'eth0\\n' is not a network interface name",
        ),
        (
            lambda v: v["directors"][0].update(hostKey="ssh-ed25519 AAAA"),
            "ipvs-ingress:directors[0].hostKey: 'ssh-ed25519 AAAA' is not a pinned host key",
        ),
        (
            lambda v: v["directors"][0].update(bootstrap=True, proxyCommand="ssh -W %h:%p b"),
            "ipvs-ingress:directors[0].bootstrap: true cannot go through director.proxyCommand",
        ),
        (
            lambda v: v["vips"][0].update(address="203.0.113.3"),
            "ipvs-ingress:vips[0].address: 203.0.113.3 is ipvs-ingress:directors[1]'s own address: a VIP moves between directors",  # fmt: skip
        ),
        (
            lambda v: (
                v["vips"][0].update(address="2001:db8::201"),
                v["realServers"][0].update(address="2001:db8::11"),
            ),
            "ipvs-ingress:vips: has no IPv4 VIP, but the directors' addresses are IPv4: VRRPv3 announces at least one VIP of its own family",  # fmt: skip
        ),
    ],
)
def test_each_problem_is_one_line_naming_field_value_and_fix(change, expected):
    assert refused(changed(PAIR, change)).startswith(expected)


def test_the_engines_defaults_for_unset_keys_mean_unset():
    # Pulumi.yaml declares director: {} and directors: [] (neither can be required by the engine).
    assert load({**SINGLE, "directors": []}) == load(SINGLE)
    assert load({**PAIR, "director": {}}) == load(PAIR)
    text = refused({**BASE, "director": {}, "directors": []})
    assert text.startswith("ipvs-ingress:director.host: None is not a host name")


def test_the_dev_stacks_commented_example_parses_as_a_pair():
    import yaml

    from tests.program.conftest import ROOT

    text = (ROOT / "stacks" / "Pulumi.dev.yaml").read_text()
    lines = text[text.index("  # ipvs-ingress:directors:") :].splitlines()
    block = [line[4:] for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("  #   ") and i)]]  # fmt: skip
    example = {"directors": yaml.safe_load("\n".join(block))["ipvs-ingress:directors"]}
    config = yaml.safe_load(text)["config"]
    values = {k.split(":", 1)[1]: v for k, v in config.items() if k != "ipvs-ingress:director"}
    cfg = load({**values, **example})
    assert [(d.address, d.priority) for d in cfg.directors] == [
        ("203.0.113.2", 150),
        ("203.0.113.3", 100),
    ]


# --- fuzz: random director lists, valid and broken ----------------------------------------------

FUZZ_CASES = 1000
_HOSTS = ["203.0.113.2", "203.0.113.3", "198.51.100.7", "2001:db8::2", "lb.example.net", "127.0.0.1"]  # fmt: skip
_ADDRESSES = [None, "203.0.113.2", "203.0.113.4", "2001:db8::9", "fe80::1", "0.0.0.0", "x", 7]
_PRIORITIES = [None, 1, 100, 100.0, 150, 254, 255, 0, -1, 99.5, True, "100", float("nan")]


def _oracle(entries: list) -> list[tuple[str, int]] | None:
    """(address, priority) per director if the list is acceptable, judged from first principles."""
    import ipaddress

    if not isinstance(entries, list) or len(entries) < 2:
        return None
    out, hosts = [], set()
    for e in entries:
        p = e.get("priority")
        if type(p) not in (int, float) or p != p or p != int(p) or not 1 <= p <= 254:
            return None
        address = e.get("address", e["host"])
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else None
        except ValueError:
            ip = None
        if ip is None or ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            return None
        if (e["host"], e.get("port", 22)) in hosts:
            return None
        hosts.add((e["host"], e.get("port", 22)))
        out.append((str(ip), int(p)))
    if len({a for a, _ in out}) < len(out) or len({p for _, p in out}) < len(out):
        return None
    if len({ipaddress.ip_address(a).version for a, _ in out}) > 1:
        return None
    if ipaddress.ip_address(out[0][0]).version != 4:  # the VIP below is IPv4 only
        return None
    return out


def test_fuzz_directors_end_in_a_config_or_one_line_and_accepted_ones_match_the_oracle():
    import random

    from tests.hostile import record

    rng = random.Random(20261202)
    accepted = 0
    for _ in range(FUZZ_CASES):
        entries = []
        for _ in range(rng.choice((1, 2, 2, 3))):
            good = rng.random() < 0.85
            host = f"203.0.113.{rng.randint(2, 9)}" if good else rng.choice(_HOSTS)
            entry = {"host": host, "hostKey": HOST_KEY}
            if rng.random() < 0.95:
                entry["priority"] = rng.randint(1, 254) if good else rng.choice(_PRIORITIES)
            if rng.random() < 0.2:
                entry["address"] = rng.choice(_ADDRESSES)
            entries.append({k: v for k, v in entry.items() if v is not None})
        values = {**BASE, "directors": entries}
        expected = _oracle(entries)
        try:
            cfg = load(values)
        except ConfigError as err:
            text = str(err)
            assert "\n" not in text and len(text) <= 300, text
            assert expected is None, (entries, text)
            continue
        assert expected is not None, entries
        assert [(d.address, d.priority) for d in cfg.directors] == expected
        accepted += 1
    assert 50 < accepted < FUZZ_CASES - 50  # both outcomes were exercised
    record(fuzz_cases=FUZZ_CASES)


# --- fuzz: ipvs-ingress:vrrp, the settings the directors share ----------------------------------

_VRIDS = [1, 51, 255, 7.0, 0, 256, -3, 51.5, True, "51", None, float("nan"), [51]]
_ADVERTS = [0.01, 0.1, 0.05, 1, 2.5, 40.95, 0.005, 40.96, 41, 0, -0.1, 0.333, True, "0.1", None, float("inf")]  # fmt: skip
_DELAYS = [0, 30, 1000, 30.0, 1001, -1, 2.5, False, "30", None, {}]


def _whole(value, lo: int, hi: int) -> int | None:
    if type(value) not in (int, float) or value != value or value in (float("inf"), float("-inf")):
        return None
    return int(value) if value == int(value) and lo <= value <= hi else None


def _vrrp_oracle(raw, directors: bool) -> dict | None:
    """The normalized settings, or None if the stack must be refused: from the contract's
    ranges, with decimal arithmetic for the 0.01 s steps (not the model's float tolerance)."""
    from decimal import Decimal

    if raw is None or raw == {}:
        return {"virtualRouterId": 51, "advertSeconds": 0.1} if directors else {}
    if not directors or not isinstance(raw, dict):
        return None
    if set(raw) - {"virtualRouterId", "advertSeconds", "preemptDelaySeconds"}:
        return None
    out = {"virtualRouterId": 51, "advertSeconds": 0.1}
    if raw.get("virtualRouterId") is not None:
        out["virtualRouterId"] = _whole(raw["virtualRouterId"], 1, 255)
    advert = raw.get("advertSeconds")
    if advert is not None:
        ok = type(advert) in (int, float) and advert == advert and abs(advert) != float("inf")
        hundredths = Decimal(repr(advert)) * 100 if ok else None
        ok = ok and hundredths == hundredths.to_integral_value() and 1 <= hundredths <= 4095
        out["advertSeconds"] = float(hundredths) / 100 if ok else None
    if raw.get("preemptDelaySeconds") is not None:
        out["preemptDelaySeconds"] = _whole(raw["preemptDelaySeconds"], 0, 1000)
    return None if None in out.values() else out


def test_fuzz_vrrp_settings_end_in_a_config_or_one_line_and_match_the_oracle():
    import random

    from tests.hostile import record

    rng = random.Random(20261210)
    accepted = refused = 0
    for _ in range(FUZZ_CASES):
        directors = rng.random() < 0.85
        roll = rng.random()
        if roll < 0.05:
            raw = rng.choice([None, {}, "fast", [51], 51])
        else:
            raw = {}
            if rng.random() < 0.7:
                good = rng.random() < 0.7
                raw["virtualRouterId"] = rng.randint(1, 255) if good else rng.choice(_VRIDS)
            if rng.random() < 0.7:
                good = rng.random() < 0.7
                raw["advertSeconds"] = rng.randint(1, 4095) / 100 if good else rng.choice(_ADVERTS)
            if rng.random() < 0.4:
                good = rng.random() < 0.7
                raw["preemptDelaySeconds"] = rng.randint(0, 1000) if good else rng.choice(_DELAYS)
            if rng.random() < 0.05:
                raw[rng.choice(["priority", "advert", "virtualRouterID"])] = 1
        values = copy.deepcopy(PAIR if directors else SINGLE)
        if raw is not None:
            values["vrrp"] = raw
        expected = _vrrp_oracle(raw, directors)
        try:
            cfg = load(values)
        except ConfigError as err:
            text = str(err)
            assert "\n" not in text and len(text) <= 300, text
            assert text.startswith("ipvs-ingress:vrrp"), text
            assert expected is None, (raw, text)
            refused += 1
            continue
        assert cfg.vrrp_settings == expected, raw
        accepted += 1
    assert accepted > 200 and refused > 200  # both outcomes were exercised
    record(fuzz_cases=FUZZ_CASES)
