"""The Kubernetes objects the program sends, checked against the upstream OpenAPI schemas.

Strict mode rejects unknown fields, so a misspelt key (e.g. `externalIps`) fails here instead of
being dropped silently by the API server.
"""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from components.config import load_stack_file
from tests.program.conftest import PRIVATE_KEY, ROOT, run_program

# The oldest Kubernetes minor still in upstream support when this was written, and the newest
# that kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.33", "1.37")
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
SERVICE = "kubernetes:core/v1:Service"


def stack_values(stack: str) -> dict:
    config = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())["config"]
    load_stack_file(config)  # fails loudly here rather than inside the program
    return {k.split(":", 1)[1]: v for k, v in config.items() if k.startswith("ipvs-ingress:")}


@pytest.fixture(scope="module", params=["dev", "prod"])
def objects(request) -> dict[str, dict]:
    run = run_program(stack_values(request.param), PRIVATE_KEY, stack=request.param)
    return {typ: run.one(typ).inputs for typ in (DEPLOYMENT, SERVICE)}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("typ", [DEPLOYMENT, SERVICE])
def test_objects_validate_strictly(objects, typ, version):
    obj = objects[typ]
    assert obj["apiVersion"] in ("apps/v1", "v1")
    assert kubernetes_validate.validate(obj, version, strict=True) == version


def test_strict_mode_catches_a_misspelt_field(objects):
    svc = copy.deepcopy(objects[SERVICE])
    svc["spec"]["externalIps"] = svc["spec"].pop("externalIPs")
    with pytest.raises(kubernetes_validate.ValidationError, match="externalIps"):
        kubernetes_validate.validate(svc, KUBERNETES_VERSIONS[-1], strict=True)


def test_prod_stack_service_lists_every_vip_and_port():
    run = run_program(stack_values("prod"), PRIVATE_KEY, stack="prod")
    svc = run.one(SERVICE).inputs
    assert svc["spec"]["externalIPs"] == ["198.51.100.10", "198.51.100.11", "2001:db8:100::10"]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["tcp-80", "tcp-8080"]
    # Both reach nginx's plain HTTP port, which is what the urls claim: no https anywhere.
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http", "http"]
    (container,) = run.one(DEPLOYMENT).inputs["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 80, "protocol": "TCP"}]
    assert run.outputs["urls"] == [
        "http://198.51.100.10:80",
        "http://198.51.100.10:8080",
        "http://198.51.100.11:80",
        "http://198.51.100.11:8080",
        "http://[2001:db8:100::10]:80",
        "http://[2001:db8:100::10]:8080",
    ]


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_no_port_claims_a_scheme_it_does_not_serve(stack):
    """443 is HTTPS by convention: no stack maps it to plain HTTP or exports http://...:443."""
    run = run_program(stack_values(stack), PRIVATE_KEY, stack=stack)
    assert all(p["port"] != 443 for p in run.one(SERVICE).inputs["spec"]["ports"])
    assert not [u for u in run.outputs["urls"] if u.endswith(":443") or u.startswith("https")]
