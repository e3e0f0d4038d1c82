"""The standing hostile suite, config layer: components.config.load and load_stack_file under a
fixed-seed fuzz of valid stack configs and hostile mutations of them (issue 7).

Every case must end in a StackConfig or a ConfigError: no other exception (a traceback), every
error one line of at most 300 characters, and none of the "accepted, and wrong" inputs of item 9
accepted. Accepted configs are judged by an oracle written here, without the validators under
test: addresses, names, numbers, the host and its key are checked from first principles.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import math
import random
import re
import string
import struct
from collections import Counter
from typing import Any

from components.config import ConfigError, load, load_stack_file
from tests import hostile
from tests.program.conftest import HOST_KEY

SEED = 20261201
CASES = 2000

V4_VIPS = [f"203.0.113.{n}" for n in range(200, 230)] + [f"198.51.100.{n}" for n in (10, 11)]
V6_VIPS = ["2001:db8::201", "2001:DB8:0::202", "2001:db8:100::10"]
V4_NODES = [f"192.0.2.{n}" for n in range(1, 40)]
V6_NODES = ["2001:db8::11", "2001:db8::12", "2001:db8:0:0::13"]
HOSTS = ["203.0.113.2", "2001:db8::2", "2001:DB8::0:2", "director.example.net", "Dir-1.Example.NET"]
SCHEDULERS = ["rr", "wlc", "sh", "WLC", "mh"]
IMAGES = ["nginx:1.27.3", "nginx@sha256:" + "ab" * 32, "registry.example.net:5000/web/nginx:1.2"]

# Item 9 inputs, each of which must be refused wherever it appears.
BAD_ADDRESSES = [
    "255.255.255.255", "240.0.0.1", "169.254.1.1", "fe80::1", "0.0.0.0", "127.0.0.1", "::1",
    "224.0.0.1", "ff02::1", "2001:db8::201%eth0", "203.0.113.201%0", "::ffff:203.0.113.9",
    "203.0.113.300", "010.0.0.2", "0.1.2.3",
]  # fmt: skip
BAD_HOSTS = [
    "203.0.113.300", "010.0.0.2", "fe80::1%eth0", "2001:db8::2%x;touch${IFS}m;true", "0x7f000001",
    "director.example.net\n", "director example", "127.1", "-x.example.net", "fe80::1", "",
]  # fmt: skip
BAD_KEYS = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
    " ".join(HOST_KEY.split()[:2])[:-8],
    f"{HOST_KEY}\n{HOST_KEY}",
    "ssh-rsa " + HOST_KEY.split()[1],
]
BAD_IMAGES = [
    "nginx@",
    "@",
    "nginx",
    "nginx:latest",
    "nginx@sha256:abc",
    "nginx:1.27.3\n",
    "NGINX:1",
]
BAD_NUMBERS = [
    10**400, -(10**400), 10**5000, math.inf, -math.inf, math.nan, 1e300, 80.5, True, False, "80",
]  # fmt: skip
HIDDEN = ["\n", " ", "\t", "\r", "\x00", "\x7f", "\u2028", "\u00a0", "\x0b"]
JUNK = [
    None, [], {}, [[{}]], {"a": {"b": [None]}}, "", "x" * 1_000_000, "é", "\u202e", 0, -1, 1.5,
    math.nan, 10**5000, True, [1, 2, 3] * 100, {"\n": 1},
]  # fmt: skip
INTEGER_FIELDS = {
    ("app", "replicas"): (0, 1000),
    ("app", "containerPort"): (1, 65535),
    ("director", "port"): (1, 65535),
}


def valid_config(rng: random.Random) -> dict[str, Any]:
    vips, families = [], set()
    for address in rng.sample(V4_VIPS, rng.randint(1, 3)) + rng.sample(V6_VIPS, rng.randint(0, 1)):
        ports = rng.sample(range(1, 65536), rng.randint(1, 3))
        vip = {
            "address": address,
            "ports": [{"port": p, "protocol": rng.choice(["tcp", "udp", "TCP"])} for p in ports],
        }
        if rng.random() < 0.5:
            vip["scheduler"] = rng.choice(SCHEDULERS)
        if rng.random() < 0.3:
            vip["persistenceSeconds"] = rng.randint(0, 2**31 - 1)
        vips.append(vip)
        families.add(6 if ":" in address else 4)
    nodes = rng.sample(V4_NODES, rng.randint(1, 4)) if 4 in families else []
    nodes += rng.sample(V6_NODES, rng.randint(1, 2)) if 6 in families else []
    director = {"host": rng.choice(HOSTS), "hostKey": HOST_KEY}
    for key, value in (("user", "ops"), ("interface", "ens3"), ("port", 2222)):
        if rng.random() < 0.3:
            director[key] = value
    values = {
        "vips": vips,
        "realServers": [{"address": a, "weight": rng.randint(0, 65535)} for a in nodes],
        "director": director,
    }
    if rng.random() < 0.3:  # ipvs-ingress:repair, as YAML gives it or as the engine hands it over
        values["repair"] = rng.choice([True, False, "true", "false"])
    if rng.random() < 0.7:
        values["app"] = {
            "name": rng.choice(["nginx", "web-1"]),
            "namespace": rng.choice(["default", "web-dev"]),
            "image": rng.choice(IMAGES),
            "replicas": rng.randint(0, 1000),
            "containerPort": rng.randint(1, 65535),
        }
    return values


# --- mutations: (name, function(rng, values) -> must the result be refused?) ----------------


def _integer_slots(values: dict) -> list[tuple[dict, str]]:
    slots = [(values.setdefault("app", {}), "replicas"), (values["app"], "containerPort")]
    slots.append((values["director"], "port"))
    for vip in values["vips"]:
        slots.append((vip, "persistenceSeconds"))
        slots += [(port, "port") for port in vip["ports"]]
        slots += [(port, "targetPort") for port in vip["ports"]]
    slots += [(rs, "weight") for rs in values["realServers"]]
    return slots


def bad_number(rng, values) -> bool:
    holder, key = rng.choice(_integer_slots(values))
    holder[key] = rng.choice(BAD_NUMBERS)
    return True


def whole_float(rng, values) -> bool:
    holder, key = rng.choice(_integer_slots(values))
    if type(holder.get(key)) is not int or abs(holder[key]) > 2**53:
        return False  # a default, or a value an earlier mutation made: nothing to change
    holder[key] = float(holder[key])
    return False  # accepted, as the integer


def _text_slots(values: dict) -> list[tuple[dict, str]]:
    app = values.setdefault("app", {})
    app.setdefault("name", "nginx")
    app.setdefault("namespace", "default")
    app.setdefault("image", "nginx:1.27.3")
    d = values["director"]
    d.setdefault("user", "root")
    d.setdefault("interface", "eth0")
    slots = [(app, "name"), (app, "namespace"), (app, "image"), (d, "host"), (d, "user")]
    slots += [(d, "interface"), (values["vips"][0], "address"), (values["realServers"][0], "address")]  # fmt: skip
    return slots


def hidden_character(rng, values) -> bool:
    holder, key = rng.choice(_text_slots(values))
    text, ch = holder[key], rng.choice(HIDDEN)
    holder[key] = rng.choice([text + ch, ch + text, text[:1] + ch + text[1:]])
    return True


def zone_id(rng, values) -> bool:
    zone = rng.choice(["%eth0", "%1", "%x;touch${IFS}m;true", "%" + "z" * 10_000])
    target = rng.choice(["vip", "rs", "host"])
    if target == "vip":
        vip = rng.choice(values["vips"])
        vip["address"] += zone
    elif target == "rs":
        rs = rng.choice(values["realServers"])
        if rng.random() < 0.5:  # the same node again, with a zone: a disguised duplicate
            values["realServers"].append({"address": rs["address"] + zone})
        else:
            rs["address"] += zone
    else:
        values["director"]["host"] = rng.choice(["2001:db8::2", "fe80::2"]) + zone
    return True


def unservable(rng, values) -> bool:
    address = rng.choice(BAD_ADDRESSES)
    if rng.random() < 0.5:
        values["vips"][0]["address"] = address
    else:
        values["realServers"].append({"address": address})
    return True


def bad_host(rng, values) -> bool:
    values["director"]["host"] = rng.choice(BAD_HOSTS)
    return True


def bad_key(rng, values) -> bool:
    values["director"]["hostKey"] = rng.choice(BAD_KEYS)
    return True


def bad_image(rng, values) -> bool:
    values.setdefault("app", {})["image"] = rng.choice(BAD_IMAGES)
    return True


def _nodes(value: Any, out: list) -> list:
    """Every (container, key) in a config tree."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in list(items):
        out.append((value, key))
        if isinstance(child, dict | list) and child:
            _nodes(child, out)
    return out


def junk(rng, values) -> bool:
    holder, key = rng.choice(_nodes(values, []))
    holder[key] = copy.deepcopy(rng.choice(JUNK))
    return False  # may be harmless (e.g. a long proxyCommand): judged by the oracle


def unknown_key(rng, values) -> bool:
    # Not at the top: load() takes only the keys __main__ reads, so others cannot reach it.
    holder = rng.choice(
        [h for h, _ in _nodes(values, []) if isinstance(h, dict) and h is not values]
    )
    holder[rng.choice(["adress", "x\ny", "é" * 50, "", "tagretPort", "k" * 100_000])] = 1
    return True


def drop_key(rng, values) -> bool:
    holder, key = rng.choice([n for n in _nodes(values, []) if isinstance(n[0], dict)])
    required = key in ("address", "host", "hostKey", "vips", "realServers", "director") or (
        key == "port" and holder is not values.get("director")  # the SSH port defaults to 22
    )
    del holder[key]
    return required


BAD_BOOLEANS = ["yes", "no", "True", "FALSE", "", "1", 0, 1, 0.0, [], {}, [True], "true\n"]


def bad_repair(rng, values) -> bool:
    values["repair"] = copy.deepcopy(rng.choice(BAD_BOOLEANS))
    return True


MUTATIONS = [
    bad_number, whole_float, hidden_character, zone_id, unservable, bad_host, bad_key,
    bad_image, junk, unknown_key, drop_key, bad_repair,
]  # fmt: skip


# --- the oracle: what an accepted config must satisfy -----------------------------------------

_NO_SERVE = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
        "::/8", "fe80::/10", "ff00::/8",
    )
]  # fmt: skip


def servable(address: str) -> bool:
    if not isinstance(address, str) or "%" in address:
        return False
    ip = ipaddress.ip_address(address)
    return str(ip) == address and not any(
        ip in net for net in _NO_SERVE if net.version == ip.version
    )


def plain_int(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def sound(cfg) -> list[str]:
    """What is wrong with an accepted config (empty if nothing)."""
    wrong = []
    app, d = cfg.app, cfg.director
    for name in (app.name, app.namespace):
        if not re.fullmatch(r"[a-z0-9-]{1,63}", name):
            wrong.append(f"app name {name!r}")
    if not (
        re.search(r"@sha(256:[0-9a-f]{64}|512:[0-9a-f]{128})$", app.image)
        or re.search(r":[\w][\w.-]*$", app.image.rsplit("/", 1)[-1])
        and not app.image.endswith(":latest")
    ) or any(ch in app.image for ch in string.whitespace):
        wrong.append(f"image {app.image!r}")
    if not plain_int(app.replicas, 0, 1000) or not plain_int(app.container_port, 1, 65535):
        wrong.append("app numbers")
    if not plain_int(d.port, 1, 65535):
        wrong.append(f"director.port {d.port!r}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*\$?", d.user):
        wrong.append(f"user {d.user!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", d.interface) or d.interface in (".", ".."):
        wrong.append(f"interface {d.interface!r}")
    wrong += host_wrongs(d.host)
    blob = base64.b64decode(d.host_key.split()[1])
    if d.host_key.split()[0] == "ssh-ed25519" and (
        len(blob) != 51 or struct.unpack(">I", blob[15:19])[0] != 32
    ):
        wrong.append("host key material")
    for vs in cfg.virtual_services:
        if not servable(vs.vip) or not plain_int(vs.port, 1, 65535):
            wrong.append(f"vip {vs.vip!r}:{vs.port!r}")
        if not plain_int(vs.persistence_seconds, 0, 2**31 - 1):
            wrong.append("persistence")
        seen = set()
        for rs in vs.real_servers:
            if not servable(rs.address) or not plain_int(rs.weight, 0, 65535):
                wrong.append(f"real server {rs.address!r}")
            if ipaddress.ip_address(rs.address) in seen:
                wrong.append(f"duplicate real server {rs.address!r}")
            seen.add(ipaddress.ip_address(rs.address))
    for vip in cfg.vips:
        for p in vip.ports:
            if not plain_int(p.target_port, 1, 65535):
                wrong.append("targetPort")
    return wrong


def host_wrongs(host: str) -> list[str]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        ok = "%" not in host and str(ip) == host and not ip.is_multicast and not ip.is_unspecified
        return [] if ok else [f"host {host!r}"]
    labels = host.split(".")
    ok = (
        all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels)
        and not re.fullmatch(r"[0-9]+|0x[0-9a-f]*", labels[-1])
        and len(host) <= 253
    )
    return [] if ok else [f"host {host!r}"]


# --- the run ---------------------------------------------------------------------------------


# These may undo another mutation (drop the bad key, replace its parent): they go first.
NEUTRAL = (junk, drop_key, whole_float)


def one_case(rng: random.Random) -> tuple[str, dict, bool]:
    values = valid_config(rng)
    must_refuse, names = False, []
    chosen = [rng.choice(MUTATIONS) for _ in range(rng.choice([0, 1, 1, 1, 2, 3]))]
    for mutation in sorted(chosen, key=lambda m: m not in NEUTRAL):
        trial = copy.deepcopy(values)
        try:
            refuse = mutation(rng, trial)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError):
            continue  # an earlier mutation left no such place: skip this one
        values, must_refuse = trial, must_refuse or refuse
        names.append(mutation.__name__)
    return "+".join(names) or "valid", values, must_refuse


def expected_repair(values: dict) -> bool | None:
    """What ipvs-ingress:repair must load as; None: it must be refused. Written from the key's
    contract (a boolean or its text, unset is true), not from the loader."""
    raw = values.get("repair")
    if raw is None:
        return True
    if type(raw) is bool:
        return raw
    return {"true": True, "false": False}.get(raw) if isinstance(raw, str) else None


def run_loader(values: dict, as_stack_file: bool):
    if as_stack_file:
        return load_stack_file({f"ipvs-ingress:{k}": v for k, v in values.items()})
    return load(values)


def test_config_loader_fuzz():
    rng = random.Random(SEED)
    tally: Counter[str] = Counter()
    failures: list[str] = []
    for i in range(CASES):
        name, values, must_refuse = one_case(rng)
        try:
            cfg = run_loader(values, as_stack_file=i % 2 == 1)
        except ConfigError as err:
            tally["refused"] += 1
            text = str(err)
            if len(text.splitlines()) != 1 or len(text) > 300:
                failures.append(f"case {i} ({name}): error of {len(text)} chars: {text[:200]!r}")
            if any(len(str(p).splitlines()) != 1 for p in err.problems):
                failures.append(f"case {i} ({name}): a problem spans several lines")
            continue
        except Exception as err:  # a traceback: the one thing that must never happen
            tally["tracebacks"] += 1
            failures.append(f"case {i} ({name}): {type(err).__name__}: {str(err)[:200]}")
            continue
        tally["accepted"] += 1
        if must_refuse:
            failures.append(f"case {i} ({name}): accepted an input that must be refused")
        failures += [f"case {i} ({name}): accepted {w}" for w in sound(cfg)]
        if cfg.repair is not expected_repair(values):
            failures.append(f"case {i} ({name}): repair {values.get('repair')!r} loaded as {cfg.repair!r}")  # fmt: skip
    assert failures == [], "\n".join(failures[:20])
    # Both outcomes were exercised in earnest.
    assert tally["accepted"] >= CASES // 10 and tally["refused"] >= CASES // 2, tally
    hostile.record(fuzz_cases=CASES, tracebacks=tally["tracebacks"])
