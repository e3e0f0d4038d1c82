"""components/config.py against the "accepted, and wrong" inputs of issue 7 (items 9, 10, 13):
one number rule in every integer field, names without hidden characters, real image digests,
bounds, targetPort, and errors of bounded size."""

from __future__ import annotations

import copy
import math

import pytest

from components.config import ConfigError, load, load_stack_file
from tests.program.conftest import HOST_KEY

MINIMAL = {
    "vips": [{"address": "203.0.113.201", "ports": [{"port": 80}]}],
    "realServers": [{"address": "203.0.113.11"}],
    "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
}
DIGEST = "sha256:" + "0123456789abcdef" * 4

# Every integer field of the stack config: where it lives, and how to read it back.
INTEGER_FIELDS = {
    "vips[0].ports[0].port": (
        lambda v, x: v["vips"][0]["ports"][0].update(port=x),
        lambda c: c.vips[0].ports[0].port,
    ),
    "vips[0].ports[0].targetPort": (
        lambda v, x: v["vips"][0]["ports"][0].update(targetPort=x),
        lambda c: c.vips[0].ports[0].target_port,
    ),
    "vips[0].persistenceSeconds": (
        lambda v, x: v["vips"][0].update(persistenceSeconds=x),
        lambda c: c.vips[0].persistence_seconds,
    ),
    "realServers[0].weight": (
        lambda v, x: v["realServers"][0].update(weight=x),
        lambda c: c.real_servers[0].weight,
    ),
    "director.port": (
        lambda v, x: v["director"].update(port=x),
        lambda c: c.director.port,
    ),
    "app.replicas": (
        lambda v, x: v.setdefault("app", {}).update(replicas=x),
        lambda c: c.app.replicas,
    ),
    "app.containerPort": (
        lambda v, x: v.setdefault("app", {}).update(containerPort=x),
        lambda c: c.app.container_port,
    ),
}


def with_change(change, base=MINIMAL) -> dict:
    values = copy.deepcopy(base)
    change(values)
    return values


def refused(values) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load(values)
    text = str(err.value)
    assert "\n" not in text and len(text) <= 300, text
    return err.value


@pytest.mark.parametrize("field", INTEGER_FIELDS)
def test_a_whole_float_is_the_integer_in_every_field(field):
    set_, get = INTEGER_FIELDS[field]
    cfg = load(with_change(lambda v: set_(v, 80.0)))
    assert get(cfg) == 80 and type(get(cfg)) is int


@pytest.mark.parametrize(
    "value",
    [
        80.5,
        True,
        False,
        "80",
        None,
        pytest.param(10**400, id="10**400"),
        pytest.param(10**5000, id="10**5000"),
        math.inf,
        -math.inf,
        math.nan,
        1e300,
        [80],
        {"n": 80},
    ],
)
@pytest.mark.parametrize("field", INTEGER_FIELDS)
def test_anything_but_a_whole_number_in_range_is_one_short_line(field, value):
    set_, _ = INTEGER_FIELDS[field]
    err = refused(with_change(lambda v: set_(v, value)))
    assert [p.field for p in err.problems] == [f"ipvs-ingress:{field}"]
    assert "is not a valid" in str(err) and "use a whole number from" in str(err)


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("app.replicas", 0, True),
        ("app.replicas", 1000, True),
        ("app.replicas", 1001, False),
        ("app.replicas", -1, False),
        ("app.containerPort", 0, False),
        ("app.containerPort", 1, True),
        ("app.containerPort", 65535, True),
        ("app.containerPort", 65536, False),
        ("director.port", 0, False),
        ("director.port", 1, True),
        ("director.port", 65535, True),
        ("director.port", 65536, False),
        ("vips[0].ports[0].targetPort", 0, False),
        ("vips[0].ports[0].targetPort", 1, True),
        ("vips[0].ports[0].targetPort", 65535, True),
        ("vips[0].ports[0].targetPort", 65536, False),
    ],
)
def test_bounds(field, value, ok):
    set_, get = INTEGER_FIELDS[field]
    values = with_change(lambda v: set_(v, value))
    if ok:
        assert get(load(values)) == value
    else:
        assert [p.field for p in refused(values).problems] == [f"ipvs-ingress:{field}"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda v: v.update(app={"name": "nginx\n"}), "app.name"),
        (lambda v: v.update(app={"name": "nginx "}), "app.name"),
        (lambda v: v.update(app={"namespace": "web\n"}), "app.namespace"),
        (lambda v: v.update(app={"namespace": "web\x00"}), "app.namespace"),
        (lambda v: v.update(app={"image": "nginx:1.27.3\n"}), "app.image"),
        (lambda v: v["director"].update(interface="eth0\n"), "director.interface"),
        (lambda v: v["director"].update(host="director.example.net\n"), "director.host"),
        (lambda v: v["director"].update(user="root\n"), "director.user"),
        (lambda v: v["director"].update(host="203.0.113.300"), "director.host"),
        (lambda v: v["director"].update(host="010.0.0.2"), "director.host"),
        (lambda v: v["director"].update(host="2001:db8::2%eth0"), "director.host"),
        (lambda v: v["vips"][0].update(address="255.255.255.255"), "vips[0].address"),
        (lambda v: v["vips"][0].update(address="240.0.0.1"), "vips[0].address"),
        (lambda v: v["vips"][0].update(address="169.254.1.1"), "vips[0].address"),
        (lambda v: v["vips"][0].update(address="203.0.113.201\n"), "vips[0].address"),
        (lambda v: v["realServers"][0].update(address="255.255.255.255"), "realServers[0].address"),
        (lambda v: v["director"].update(hostKey="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"), "director.hostKey"),
        (lambda v: v.update(app={"image": "nginx@"}), "app.image"),
        (lambda v: v.update(app={"image": "@"}), "app.image"),
        (lambda v: v.update(app={"image": "nginx@sha256:abc"}), "app.image"),
        (lambda v: v.update(app={"image": "nginx@md5:" + "0" * 32}), "app.image"),
        (lambda v: v.update(app={"image": "nginx:"}), "app.image"),
        (lambda v: v.update(app={"image": "Nginx:1.27.3"}), "app.image"),
        (lambda v: v.update(app={"image": "nginx:latest"}), "app.image"),
        (lambda v: v.update(app={"image": "registry.example.net/nginx"}), "app.image"),
    ],
)  # fmt: skip
def test_accepted_and_wrong_inputs_are_refused(change, field):
    err = refused(with_change(change))
    assert [p.field for p in err.problems] == [f"ipvs-ingress:{field}"]


def test_ipv6_zone_ids_and_their_duplicates_are_refused():
    values = {
        **MINIMAL,
        "vips": [{"address": "2001:db8::201%eth0", "ports": [{"port": 80}]}],
        "realServers": [{"address": "2001:db8::11"}, {"address": "2001:db8::11%eth1"}],
    }
    fields = [p.field for p in refused(values).problems]
    assert "ipvs-ingress:vips[0].address" in fields
    assert "ipvs-ingress:realServers[1].address" in fields


@pytest.mark.parametrize(
    "image",
    [
        f"nginx@{DIGEST}",
        f"nginx:1.27.3@{DIGEST}",
        f"registry.example.net:5000/team/nginx@{DIGEST}",
        "registry.example.net:5000/team/nginx:1.27.3",
        "nginx:1.27.3-alpine",
        "library/nginx:stable",
    ],
)
def test_pinned_images_pass(image):
    assert load(with_change(lambda v: v.update(app={"image": image}))).app.image == image


def test_configured_director_fields_are_kept():
    director = {"user": "ops", "interface": "ens3", "port": 2222, "host": "Director.Example.NET"}
    cfg = load(with_change(lambda v: v["director"].update(director)))
    d = cfg.director
    assert (d.user, d.interface, d.port, d.host) == ("ops", "ens3", 2222, "director.example.net")


# --- targetPort (item 13) ---


def test_target_port_defaults_to_the_container_port():
    cfg = load(with_change(lambda v: v.update(app={"containerPort": 8080})))
    assert cfg.vips[0].ports[0].target_port == 8080
    assert cfg.urls == ("http://203.0.113.201:80",)


def test_urls_say_http_only_where_nginx_serves_it():
    values = with_change(
        lambda v: v["vips"][0].update(
            ports=[
                {"port": 80},
                {"port": 8080, "targetPort": 80},
                {"port": 443, "targetPort": 8443},
                {"port": 53, "protocol": "udp"},
            ]
        )
    )
    cfg = load(values)
    assert cfg.urls == (
        "http://203.0.113.201:80",
        "http://203.0.113.201:8080",
        "tcp://203.0.113.201:443",
        "udp://203.0.113.201:53",
    )
    assert not any(u.startswith("https") for u in cfg.urls)


def test_one_port_of_several_vips_must_target_one_container_port():
    values = with_change(
        lambda v: v["vips"].append(
            {"address": "203.0.113.202", "ports": [{"port": 80, "targetPort": 8080}]}
        )
    )
    err = refused(values)
    assert [p.field for p in err.problems] == ["ipvs-ingress:vips[1].ports[0].targetPort"]
    assert "8080 differs from ipvs-ingress:vips[0].ports[0].targetPort (80)" in str(err)


def test_an_unknown_port_key_is_still_a_typo():
    err = refused(with_change(lambda v: v["vips"][0]["ports"][0].update(target=80)))
    assert "did you mean 'targetPort'?" in str(err)


# --- hostile shapes: one bounded line, never a crash (item 10) ---


@pytest.mark.parametrize(
    "change",
    [
        lambda v: v["vips"][0].update(scheduler="x" * 1_000_000),
        lambda v: v["vips"][0]["ports"][0].update(protocol="x" * 1_000_000),
        lambda v: v["vips"][0]["ports"][0].update(protocol=10**5000),
        lambda v: v["vips"][0]["ports"].append({"port": 80, "protocol": "x\ny" * 100}),
        lambda v: v.update(app={"name": "n" * 1_000_000}),
        lambda v: v["director"].update({"x\n" * 1000: 1}),
        lambda v: v["director"].update({"bootstrap": "y" * 1_000_000}),
        lambda v: v["vips"][0].update({10**5000: 1}),
        lambda v: v.update(vips=[[[[[[[]]]]]]] * 50),
        lambda v: v.update(realServers=["203.0.113.11"] * 100),
    ],
)
def test_hostile_values_give_one_bounded_line(change):
    err = refused(with_change(change))
    for problem in err.problems:
        assert "\n" not in problem.field and len(str(problem)) <= 300


@pytest.mark.parametrize(
    "config",
    [None, [], "x", 10**5000, [("ipvs-ingress:app", {})]],
    ids=["null", "list", "str", "huge-int", "pairs"],
)
def test_a_stack_config_that_is_not_a_mapping_is_one_line(config):
    with pytest.raises(ConfigError) as err:
        load_stack_file(config)
    assert "is not a mapping" in str(err.value)


def test_stack_file_keys_that_are_not_strings_are_not_ours():
    config = {f"ipvs-ingress:{k}": v for k, v in MINIMAL.items()}
    config[1] = "x"
    config[None] = "y"
    assert load_stack_file(config).vips[0].address == "203.0.113.201"


@pytest.mark.parametrize("entry", [{}, {"address": "203.0.113.202"}], ids=["empty", "no-ports"])
def test_a_vip_entry_without_ports_is_refused_not_a_crash(entry):
    # Found by the fuzz: an empty VIP mapping skipped every check, then crashed (IndexError).
    err = refused(with_change(lambda v: v["vips"].append(entry)))
    assert [p.field for p in err.problems] == ["ipvs-ingress:vips[1].ports"]
