"""The externalIP guard (CVE-2020-8554): what the program registers, the upstream schemas, and
the policy's own CEL run by a real CEL implementation (cel-python) on hand-written Services.

The Kubernetes ip()/cidr() functions are implemented here from their documented Go semantics
(net/netip parsing: no zones, no leading zeros, no IPv4-mapped IPv6, no netmask prefixes); the
code under test only writes the expressions, so nothing here is computed by it.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import celpy
import kubernetes_validate
import pulumi
import pytest
import yaml
from celpy import celtypes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import ConfigError, load, load_stack_file
from tests import hostile
from tests.program.conftest import DEV_CONFIG, HOST_KEY, PRIVATE_KEY, ROOT, Run, run_program

GUARD = "ipvs-ingress:index:ExternalIPGuard"
POLICY = "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicy"
BINDING = "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicyBinding"
# 1.31: the first release whose API server compiles new expressions with ip() and cidr().
KUBERNETES_VERSIONS = ("1.31", "1.33", "1.37")
POOL = ["198.51.100.0/24", "2001:db8:100::/64"]
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


# --- Kubernetes' CEL ip/cidr libraries, independently ---------------------------------------


@dataclass(frozen=True)
class K8sIP:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class K8sCIDR:
    net: ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_ip(text: Any) -> K8sIP:
    """k8s.io/apiserver/pkg/cel/library/ip.go: netip.ParseAddr, then no zone, no 4-in-6."""
    if not isinstance(text, str):
        raise TypeError("no such overload")
    if "%" in text:
        raise ValueError(f"IP address {text!r} with zone value is not allowed")
    addr = ipaddress.ip_address(text)  # rejects IPv4 leading zeros, as netip does
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise ValueError(f"IPv4-mapped IPv6 address {text!r} is not allowed")
    return K8sIP(addr)


def k8s_ip(text):
    return _parse_ip(text)


def k8s_is_ip(text):
    try:
        _parse_ip(text)
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def k8s_cidr(text):
    """cidr.go: netip.ParsePrefix (address/bits, bits in decimal), then no 4-in-6."""
    if not isinstance(text, str):
        raise TypeError("no such overload")
    address, _, bits = text.partition("/")
    if not bits.isdigit():
        raise ValueError(f"network address parse error: {text!r}")
    ip = _parse_ip(address)
    return K8sCIDR(ipaddress.ip_network(f"{ip.addr}/{int(bits)}", strict=False))


def k8s_contains_ip(cidr, other):
    if not isinstance(cidr, K8sCIDR):
        raise TypeError("no such overload")
    ip = other if isinstance(other, K8sIP) else _parse_ip(other)
    same_family = ip.addr.version == cidr.net.version
    return celtypes.BoolType(same_family and ip.addr in cidr.net)


def k8s_string(value):
    """string(): the ip_to_string overload (canonical form), else CEL's own conversion."""
    if isinstance(value, K8sIP):
        return celtypes.StringType(str(value.addr))
    return celtypes.StringType(value)


K8S_FUNCTIONS = {
    "ip": k8s_ip,
    "isIP": k8s_is_ip,
    "cidr": k8s_cidr,
    "containsIP": k8s_contains_ip,
    "string": k8s_string,
}


def test_the_function_doubles_follow_the_documented_examples():
    env = celpy.Environment()

    def run(expr: str):
        return env.program(env.compile(expr), functions=K8S_FUNCTIONS).evaluate({})

    assert run("isIP('127.0.0.1') && isIP('::1')")
    assert not run("isIP('127.0.0.256') || isIP(':::1') || isIP('fe80::1%eth0')")
    assert not run("isIP('::ffff:1.2.3.4') || isIP('010.0.0.1')")
    assert run("string(ip('2001:DB8:0::ABCD')) == '2001:db8::abcd'")
    assert run("cidr('192.168.0.0/24').containsIP(ip('192.168.0.1'))")
    assert not run("cidr('192.168.0.0/24').containsIP('192.168.1.1')")
    assert not run("cidr('::/0').containsIP('192.168.1.1')")
    with pytest.raises(celpy.CELEvalError):
        run("cidr('192.168.0.0/255.255.255.0')")


# --- the admission chain, as the API server runs a ValidatingAdmissionPolicy ------------------


class Policy:
    """matchConditions, then variables in order, then validations; failurePolicy Fail."""

    def __init__(self, spec: dict):
        assert spec["failurePolicy"] == "Fail"
        self.env = celpy.Environment()
        self.spec = spec
        self.conditions = [self._compile(m["expression"]) for m in spec["matchConditions"]]
        self.variables = [(v["name"], self._compile(v["expression"])) for v in spec["variables"]]
        self.validations = [
            (self._compile(v["expression"]), self._compile(v["messageExpression"]), v)
            for v in spec["validations"]
        ]

    def _compile(self, expr: str):
        return self.env.program(self.env.compile(expr), functions=K8S_FUNCTIONS)

    def review(self, service: dict, old: dict | None = None) -> list[str]:
        """The messages of the validations that deny this request; [] if it is admitted."""
        rule = self.spec["matchConstraints"]["resourceRules"][0]
        operation = "CREATE" if old is None else "UPDATE"
        assert operation in rule["operations"] and rule["resources"] == ["services"]
        request = {
            "operation": operation,
            "namespace": service["metadata"]["namespace"],
            "name": service["metadata"]["name"],
        }
        activation = {
            "object": celpy.json_to_cel(service),
            "oldObject": celpy.json_to_cel(old),
            "request": celpy.json_to_cel(request),
        }
        try:
            if not all(c.evaluate(activation) for c in self.conditions):
                return []
            values: dict = {}
            activation["variables"] = celtypes.MapType(values)
            for name, program in self.variables:
                values[celtypes.StringType(name)] = program.evaluate(activation)
                activation["variables"] = celtypes.MapType(values)
            denied = []
            for check, message, validation in self.validations:
                if not check.evaluate(activation):
                    try:
                        denied.append(str(message.evaluate(activation)))
                    except celpy.CELEvalError:
                        denied.append(validation["message"])
            return denied
        except celpy.CELEvalError as err:  # failurePolicy: Fail
            return [f"evaluation error: {err}"]


def service(namespace: str, name: str, external_ips: list[str] | None, **labels: str) -> dict:
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "selector": {"app": name},
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    }
    if external_ips is not None:
        spec["externalIPs"] = external_ips
    metadata = {"name": name, "namespace": namespace, "labels": labels}
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


# This stack's Service as the cluster holds it: DEV_CONFIG's app and VIPs.
OWN = service("web-dev", "nginx", ["203.0.113.201", "203.0.113.202", "2001:db8::201"])


def claim(vip: str, owner: str = "ipvs-ingress/dev", service: str = "web-dev/nginx") -> str:
    return (
        f"spec.externalIPs: {vip} is a VIP of ipvs-ingress stack {owner}, reserved for "
        f"Service {service} (CVE-2020-8554): remove it from this Service"
    )


@pytest.fixture(scope="module")
def pool_run() -> Run:
    return run_program({**DEV_CONFIG, "externalIPPool": POOL})


@pytest.fixture(scope="module")
def policy(dev_run) -> Policy:
    return Policy(dev_run.one(POLICY).inputs["spec"])


@pytest.fixture(scope="module")
def pool_policy(pool_run) -> Policy:
    return Policy(pool_run.one(POLICY).inputs["spec"])


def test_own_service_with_its_vips_is_admitted(policy, pool_policy):
    assert policy.review(OWN) == []
    assert policy.review(OWN, old=OWN) == []
    assert pool_policy.review(OWN) == []  # the VIPs need not be in the pool
    relabelled = service("web-dev", "nginx", OWN["spec"]["externalIPs"], tier="web")
    assert policy.review(relabelled, old=OWN) == []


def test_services_without_external_ips_are_admitted(policy, pool_policy):
    for p in (policy, pool_policy):
        assert p.review(service("team-b", "shop", None)) == []
        assert p.review(service("team-b", "shop", [])) == []
        assert p.review(service("team-b", "shop", None), old=service("team-b", "shop", None)) == []


@pytest.mark.parametrize(
    ("namespace", "name"),
    [("team-b", "shop"), ("default", "nginx"), ("web-dev", "nginx-copy")],
    ids=["foreign", "same-name-other-namespace", "same-namespace-other-name"],
)
def test_another_service_claiming_a_vip_is_denied_with_the_vip_and_owner(policy, namespace, name):
    intruder = service(namespace, name, ["192.0.2.10", "203.0.113.202"])
    assert policy.review(intruder) == [claim("203.0.113.202")]


def test_a_vip_written_another_way_is_still_a_vip(policy):
    assert policy.review(service("team-b", "shop", ["2001:DB8:0::201"])) == [
        claim("2001:DB8:0::201")
    ]


@pytest.mark.parametrize("disguised", ["::ffff:203.0.113.201", "203.0.113.0201"])
def test_addresses_the_guard_cannot_read_are_denied(policy, disguised):
    (message,) = policy.review(service("team-b", "shop", [disguised]))
    assert message.startswith(f"spec.externalIPs: {disguised} is not in standard form")
    assert "ipvs-ingress externalIP guard of stack ipvs-ingress/dev" in message


def test_two_vips_claimed_name_the_first_and_count_the_rest(policy):
    intruder = service("team-b", "shop", ["2001:db8::201", "203.0.113.201"])
    assert policy.review(intruder) == [claim("2001:db8::201") + " (and 1 more)"]


def test_other_addresses_are_free_without_a_pool(policy):
    assert policy.review(service("team-b", "shop", ["192.0.2.10", "2001:db8:7::1"])) == []


def test_an_update_that_adds_a_vip_to_a_foreign_service_is_denied(policy):
    before = service("team-b", "shop", ["192.0.2.10"])
    after = service("team-b", "shop", ["192.0.2.10", "203.0.113.201"])
    assert policy.review(after, old=before) == [claim("203.0.113.201")]
    assert policy.review(after, old=service("team-b", "shop", None)) == [claim("203.0.113.201")]


def test_an_update_keeping_a_claim_made_before_the_guard_is_admitted(policy):
    # As DenyServiceExternalIPs does: only new addresses are judged, so an old Service can
    # still be edited, lose its finalizers and be deleted; it can drop the VIP too.
    before = service("team-b", "shop", ["203.0.113.201"])
    assert policy.review(service("team-b", "shop", ["203.0.113.201"], x="y"), old=before) == []
    assert policy.review(service("team-b", "shop", None), old=before) == []
    # But not swap one VIP for another.
    swapped = service("team-b", "shop", ["203.0.113.201", "203.0.113.202"])
    assert policy.review(swapped, old=before) == [claim("203.0.113.202")]


def test_pool_admits_inside_and_denies_outside(pool_policy):
    for inside in ("198.51.100.50", "2001:db8:100::5"):
        assert pool_policy.review(service("team-b", "shop", [inside])) == []
    pool = "198.51.100.0/24, 2001:db8:100::/64"
    for outside in ("192.0.2.10", "2001:db8:200::5", "198.51.101.1"):
        assert pool_policy.review(service("team-b", "shop", ["198.51.100.50", outside])) == [
            f"spec.externalIPs: {outside} is outside the externalIP pool ({pool}) that the "
            "ipvs-ingress externalIP guard of stack ipvs-ingress/dev allows: use an address "
            "from the pool, or have it added to ipvs-ingress:externalIPPool"
        ]
    # A VIP is denied as a VIP, not also as outside the pool.
    assert pool_policy.review(service("team-b", "shop", ["203.0.113.201"])) == [
        claim("203.0.113.201")
    ]
    # Updates are judged by what they add here too.
    before = service("team-b", "shop", ["192.0.2.10"])
    assert pool_policy.review(service("team-b", "shop", ["192.0.2.10"], x="y"), old=before) == []


def test_two_stacks_guard_their_own_vips_only(policy):
    other = copy.deepcopy(DEV_CONFIG)
    other["app"] = {"name": "web", "namespace": "shop"}
    other["vips"] = [{"address": "192.0.2.80", "ports": [{"port": 80}]}]
    other["realServers"] = [{"address": "192.0.2.11"}]
    prod = Policy(run_program(other, stack="prod").one(POLICY).inputs["spec"])
    prod_service = service("shop", "web", ["192.0.2.80"])
    assert policy.review(prod_service) == [] and prod.review(OWN) == []
    assert prod.review(service("team-b", "shop", ["192.0.2.80"])) == [
        claim("192.0.2.80", owner="ipvs-ingress/prod", service="shop/web")
    ]


def test_prod_stack_file_guards_its_vips_and_pool():
    config = yaml.safe_load((ROOT / "stacks" / "Pulumi.prod.yaml").read_text())["config"]
    values = {k.split(":", 1)[1]: v for k, v in config.items()}
    run = run_program(values, PRIVATE_KEY, stack="prod")
    for version in KUBERNETES_VERSIONS:
        for typ in (POLICY, BINDING):
            assert kubernetes_validate.validate(run.one(typ).inputs, version, strict=True)
    prod = Policy(run.one(POLICY).inputs["spec"])
    own = service("web", "nginx", ["198.51.100.10", "198.51.100.11", "2001:db8:100::10"])
    assert prod.review(own) == []
    assert prod.review(service("team-b", "shop", ["198.51.100.200", "2001:db8:100:1::9"])) == []
    (message,) = prod.review(service("team-b", "shop", ["198.51.100.20"]))
    assert message.startswith("spec.externalIPs: 198.51.100.20 is outside the externalIP pool")
    assert prod.review(service("team-b", "shop", ["2001:db8:100::10"])) == [
        claim("2001:db8:100::10", owner="ipvs-ingress/prod", service="web/nginx")
    ]


# --- what the program registers ----------------------------------------------------------------


def test_guard_is_on_by_default_and_binds_its_policy_with_deny(dev_run):
    (guard,) = dev_run.of_type(GUARD)
    policy, binding = dev_run.one(POLICY), dev_run.one(BINDING)
    for reg in (policy, binding):
        assert reg.parent.endswith(f"{GUARD}::external-ip-guard")
        assert reg.inputs["metadata"]["annotations"] == {"ipvs-ingress/owner": "ipvs-ingress/dev"}
    spec = policy.inputs["spec"]
    assert spec["matchConstraints"] == {
        "resourceRules": [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["services"],
            }
        ]
    }
    assert binding.inputs["spec"] == {
        "policyName": policy.inputs["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    # The binding waits for its policy.
    assert any(u.endswith(f"{POLICY}::external-ip-guard-policy") for u in binding.dependencies)


def test_the_service_waits_for_the_guard(dev_run):
    # Renaming the app replaces the Service: the policy must name the new one first.
    (svc,) = dev_run.of_type("kubernetes:core/v1:Service")
    waits_for = {u.rsplit("::", 1)[1] for u in svc.dependencies}
    assert {"external-ip-guard-policy", "external-ip-guard-binding"} <= waits_for


@pytest.mark.parametrize(
    "values",
    [{"guardExternalIPs": False}, {"guardExternalIPs": False, "externalIPPool": []}],
)
def test_guard_off_registers_no_policy(values):
    run = run_program({**DEV_CONFIG, **values})
    assert run.of_type(GUARD) == run.of_type(POLICY) == run.of_type(BINDING) == []
    (svc,) = run.of_type("kubernetes:core/v1:Service")  # the rest is still there
    assert svc.dependencies == []


def test_the_engines_text_values_are_read(dev_run):
    # The engine hands a boolean over as "true"/"false".
    assert run_program(DEV_CONFIG, raw={"guardExternalIPs": "false"}).of_type(POLICY) == []
    assert run_program(DEV_CONFIG, raw={"guardExternalIPs": "true"}).of_type(POLICY)


def test_names_are_stack_specific_and_valid():
    names = {}
    for stack in ("dev", "prod", "Dev", "team_a.dev", "team-a-dev"):
        run = run_program(DEV_CONFIG, stack=stack)
        policy, binding = run.one(POLICY), run.one(BINDING)
        name = policy.inputs["metadata"]["name"]
        assert binding.inputs["metadata"]["name"] == name
        assert DNS_SUBDOMAIN.match(name) and len(name) <= 63, name
        assert policy.inputs["metadata"]["annotations"]["ipvs-ingress/owner"] == (
            f"ipvs-ingress/{stack}"
        )
        names[stack] = name
    assert len(set(names.values())) == len(names), names
    assert names["dev"].startswith("ipvs-ingress-dev-")


@pytest.mark.parametrize(
    ("values", "raw", "expected"),
    [
        (
            {},
            {"guardExternalIPs": "yes"},
            "ipvs-ingress:guardExternalIPs: 'yes' is not a boolean: use true to deny other "
            "Services this stack's VIPs as externalIPs (CVE-2020-8554), false to leave "
            "Services unguarded",
        ),
        (
            {},
            {"guardExternalIPs": "True\n"},
            "ipvs-ingress:guardExternalIPs: 'True\\n' is not a boolean: use true",
        ),
        (
            {"externalIPPool": ["198.51.100.1/24"]},
            {},
            "ipvs-ingress:externalIPPool[0]: '198.51.100.1/24' is not a CIDR: it has host "
            "bits set: write 198.51.100.0/24",
        ),
        (
            {"externalIPPool": ["198.51.100.0/255.255.255.0"]},
            {},
            "ipvs-ingress:externalIPPool[0]: '198.51.100.0/255.255.255.0' is not a CIDR: write "
            "address/prefix-length",
        ),
        (
            {"externalIPPool": ["2001:db8:100::/64", "fe80::%eth0/64"]},
            {},
            "ipvs-ingress:externalIPPool[1]: 'fe80::%eth0/64' is not a CIDR: write "
            "address/prefix-length",
        ),
        (
            {"externalIPPool": ["::ffff:198.51.100.0/120"]},
            {},
            "ipvs-ingress:externalIPPool[0]: '::ffff:198.51.100.0/120' is not a CIDR: cidr() "
            "refuses IPv4-mapped IPv6 networks",
        ),
        (
            {"externalIPPool": "198.51.100.0/24"},
            {},
            "ipvs-ingress:externalIPPool: '198.51.100.0/24' is not a list of CIDRs",
        ),
        (
            {"externalIPPool": ["198.51.100.0/24"], "guardExternalIPs": False},
            {},
            "ipvs-ingress:externalIPPool: ['198.51.100.0/24'] is set but "
            "ipvs-ingress:guardExternalIPs is false, so nothing enforces it",
        ),
        (
            {"externalIPPool": ["x" * 10_000]},
            {},
            "ipvs-ingress:externalIPPool[0]: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... is not",
        ),
    ],
    ids=[
        "yes",
        "newline",
        "host-bits",
        "netmask",
        "zone",
        "mapped",
        "not-a-list",
        "pool-no-guard",
        "long",
    ],
)
def test_bad_guard_config_is_one_line(values, raw, expected):
    with pytest.raises(pulumi.RunError) as err:
        run_program({**DEV_CONFIG, **values}, raw=raw)
    message = str(err.value)
    assert message.startswith(expected)
    assert "\n" not in message and len(message) <= 300


def test_an_ipv4_mapped_vip_is_refused():
    # ip() in the guard's CEL refuses such a VIP, and so does the provider: one line, one problem.
    values = copy.deepcopy(DEV_CONFIG)
    values["vips"][2]["address"] = "::ffff:203.0.113.209"
    with pytest.raises(pulumi.RunError) as err:
        run_program(values)
    message = str(err.value)
    assert message.startswith(
        "ipvs-ingress:vips[2].address: '::ffff:203.0.113.209' cannot be a VIP"
    )
    assert "IPv4-mapped" in message and "more)" not in message


def test_stack_file_keys_are_read():
    config = {
        "ipvs-ingress:vips": [{"address": "203.0.113.201", "ports": [{"port": 80}]}],
        "ipvs-ingress:realServers": [{"address": "203.0.113.11"}],
        "ipvs-ingress:director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
        "ipvs-ingress:externalIPPool": ["2001:DB8:100::/64"],
    }
    assert load_stack_file(config).guard.pool == ("2001:db8:100::/64",)
    with pytest.raises(ConfigError, match=r"^ipvs-ingress:guardExternalIPs: 'on' is not"):
        load_stack_file({**config, "ipvs-ingress:guardExternalIPs": "on"})
    with pytest.raises(ConfigError, match=r"ipvs-ingress:guardExternalIP: unknown key .* did you"):
        load_stack_file({**config, "ipvs-ingress:guardExternalIP": True})


_ADDRESS = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["::ffff:198.51.100.0", "198.51.100.010", "2001:DB8::", "fe80::", "", "x"]),
)
_BITS = st.one_of(
    st.integers(-1, 130).map(str),
    st.sampled_from(["255.255.255.0", "024", "+24", " 24", "24\n", "\u0662\u0664", ""]),
)
_CIDRISH = st.builds(
    lambda address, zone, bits: f"{address}{zone}/{bits}",
    _ADDRESS,
    st.sampled_from(["", "", "", "%eth0", "%1"]),
    _BITS,
)
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
FUZZ_CASES = 1000


@settings(
    max_examples=FUZZ_CASES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    guard=st.one_of(_JUNK, st.sampled_from(["true", "false", "True", "yes", "on", "1"])),
    pool=st.one_of(_JUNK, st.lists(st.one_of(_CIDRISH, _JUNK, st.lists(_JUNK)), max_size=4)),
)
def check_guard_keys(guard, pool):
    """Any value: one line or a config whose every pool CIDR cidr() accepts, in canonical form."""
    values = {**DEV_CONFIG, "guardExternalIPs": guard, "externalIPPool": pool}
    try:
        cfg = load(values)
    except ConfigError as err:
        assert "\n" not in str(err)
        assert all(len(str(p)) <= 300 for p in err.problems), err.problems
        return
    assert guard in (True, False, None, "true", "false")
    for cidr in cfg.guard.pool:
        net = k8s_cidr(cidr).net
        assert cidr == f"{net.network_address}/{net.prefixlen}"


def test_fuzz_guard_keys():
    check_guard_keys()
    hostile.record(fuzz_cases=FUZZ_CASES)  # only once every case has passed


# --- the upstream OpenAPI schemas --------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("typ", [POLICY, BINDING])
def test_objects_validate_strictly(dev_run, pool_run, typ, version):
    for run in (dev_run, pool_run):
        obj = run.one(typ).inputs
        assert obj["apiVersion"] == "admissionregistration.k8s.io/v1"
        assert kubernetes_validate.validate(obj, version, strict=True) == version


def test_strict_mode_catches_a_misspelt_policy_field(dev_run):
    obj = copy.deepcopy(dev_run.one(POLICY).inputs)
    obj["spec"]["validation"] = obj["spec"].pop("validations")
    with pytest.raises(kubernetes_validate.ValidationError, match="validation"):
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
