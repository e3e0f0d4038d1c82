"""Pulumi.yaml and the example stacks: valid for Pulumi, parseable by the program, no secrets."""

from __future__ import annotations

import ipaddress
import re

import pytest
import yaml

from components.config import GUARD_KEYS, KEYS, SECRET_KEY, Guard, load_stack_file
from providers.model import parse_host_key
from tests.program.conftest import ROOT

# Pulumi's project schema (sdk/go/common/workspace/project.json): the declaration keys and types.
CONFIG_TYPES = {"string", "integer", "boolean", "array", "object"}
DECLARATION_KEYS = {"type", "items", "description", "secret", "default", "value"}
# RFC 5737 documentation ranges and RFC 3849 for IPv6.
DOC_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]
# The repository's stacks: not stacks/Pulumi.lab.yaml, which `./dev lab up` writes (gitignored),
# so `./dev lab up` then `./dev test` works.
STACKS = sorted(p for p in (ROOT / "stacks").glob("Pulumi.*.yaml") if p.name != "Pulumi.lab.yaml")


@pytest.fixture(scope="module")
def project() -> dict:
    return yaml.safe_load((ROOT / "Pulumi.yaml").read_text())


def test_project_runtime_and_layout(project):
    assert project["name"] == "ipvs-ingress"
    assert project["runtime"] == {
        "name": "python",
        "options": {"toolchain": "pip", "virtualenv": "venv"},
    }
    assert project["stackConfigDir"] == "stacks"
    assert (ROOT / project["stackConfigDir"]).is_dir()


def test_config_declarations_are_typed_and_described(project):
    config = project["config"]
    assert set(config) == {*KEYS, SECRET_KEY}
    for key, decl in config.items():
        assert set(decl) <= DECLARATION_KEYS, key
        assert decl["type"] in CONFIG_TYPES, key
        assert decl["description"].strip(), key
        if decl["type"] == "array":
            assert decl["items"]["type"] in CONFIG_TYPES, key


def test_private_key_is_a_secret_without_a_default(project):
    decl = project["config"][SECRET_KEY]
    assert decl == {"type": "string", "secret": True, "description": decl["description"]}


def test_only_app_the_guard_kubernetes_repair_and_health_are_optional(project):
    # Every other key has no sensible default: the engine then insists that a stack sets it.
    config = project["config"]
    # director and directors (issue 10) are alternatives, so the engine cannot insist on either:
    # their defaults ({} and []) mean unset, and the config layer names what is missing.
    assert {k for k, d in config.items() if "default" in d} == {
        "director",
        "directors",
        "app",
        "guardExternalIPs",
        "externalIPPool",
        "kubernetes",
        "repair",
        "health",
        "vrrp",
    }
    assert config["app"]["default"] == {}
    # The engine passes vrrp's default {} to a one-director stack too: it means unset, no problem.
    assert config["vrrp"] == {**config["vrrp"], "type": "object", "default": {}}
    single = yaml.safe_load(STACKS[0].read_text())["config"]
    assert load_stack_file({**single, "ipvs-ingress:vrrp": {}}) == load_stack_file(single)
    assert (config["director"]["default"], config["directors"]["default"]) == ({}, [])
    assert config["health"] == {**config["health"], "type": "object", "default": {}}
    assert config["kubernetes"] == {**config["kubernetes"], "type": "boolean", "default": True}
    assert config["repair"] == {**config["repair"], "type": "boolean", "default": True}
    # The defaults the engine passes mean what the program assumes when a key is unset: on, no pool.
    stack = yaml.safe_load(STACKS[0].read_text())["config"]
    defaults = {f"ipvs-ingress:{k}": config[k]["default"] for k in GUARD_KEYS}
    assert load_stack_file({**stack, **defaults}).guard == load_stack_file(stack).guard
    assert load_stack_file(stack).guard == Guard(enabled=True, pool=())
    with_default = {**stack, "ipvs-ingress:kubernetes": config["kubernetes"]["default"]}
    assert load_stack_file(with_default).kubernetes is load_stack_file(stack).kubernetes is True
    # directors' default [] means unset: the stack's own director is kept as it is.
    assert load_stack_file({**stack, "ipvs-ingress:directors": []}) == load_stack_file(stack)
    # ipvs-ingress:health's default {} means what unset means: every check at its defaults.
    with_default = {**stack, "ipvs-ingress:health": config["health"]["default"]}
    assert load_stack_file(with_default).health == load_stack_file(stack).health


def test_there_are_dev_and_prod_stacks():
    assert [p.name for p in STACKS] == ["Pulumi.dev.yaml", "Pulumi.prod.yaml"]


@pytest.mark.parametrize("path", STACKS, ids=lambda p: p.name)
def test_stack_parses_through_the_config_layer(path):
    config = yaml.safe_load(path.read_text())["config"]
    cfg = load_stack_file(config)
    assert cfg.vips and cfg.real_servers and cfg.virtual_services
    assert parse_host_key(cfg.director.host_key)[0] == "ssh-ed25519"


@pytest.mark.parametrize("path", STACKS, ids=lambda p: p.name)
def test_stack_holds_no_secret(path):
    text = path.read_text()
    config = yaml.safe_load(text)["config"]
    assert f"ipvs-ingress:{SECRET_KEY}" not in config
    assert "secure:" not in text
    assert "PRIVATE KEY" not in text
    assert "encryptionsalt" not in text


@pytest.mark.parametrize("path", STACKS, ids=lambda p: p.name)
def test_stack_uses_documentation_addresses_only(path):
    config = yaml.safe_load(path.read_text())["config"]
    cfg = load_stack_file(config)
    addresses = [v.address for v in cfg.vips] + [r.address for r in cfg.real_servers]
    addresses.append(cfg.director.host)
    for address in addresses:
        ip = ipaddress.ip_address(address)
        assert any(ip in net for net in DOC_NETS), address
    # And nothing that looks like an address slipped in elsewhere (e.g. in a comment).
    for literal in re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", path.read_text()):
        assert any(ipaddress.ip_address(literal) in net for net in DOC_NETS), literal


def test_workflow_previews_every_stack_on_pull_requests_and_ups_on_main():
    workflow = yaml.safe_load((ROOT / ".github/workflows/pulumi.yml").read_text())
    stacks = [p.name.split(".")[1] for p in STACKS]
    jobs = workflow["jobs"]
    for job, command in (("preview", "preview"), ("up", "up")):
        assert [m["stack"] for m in jobs[job]["strategy"]["matrix"]["include"]] == stacks
        (step,) = [s for s in jobs[job]["steps"] if s.get("with", {}).get("command")]
        assert step["with"]["command"] == command
        assert step["with"]["stack-name"] == "${{ matrix.stack }}"
    assert jobs["preview"]["steps"][-1]["with"]["comment-on-pr"] is True
    assert "pull_request" in jobs["preview"]["if"]
    assert "refs/heads/main" in jobs["up"]["if"]
    # Every action pinned to an exact release.
    uses = [s["uses"] for j in jobs.values() for s in j["steps"] if "uses" in s]
    assert uses and all(re.fullmatch(r"[\w-]+/[\w-]+@v\d+\.\d+\.\d+", u) for u in uses), uses
