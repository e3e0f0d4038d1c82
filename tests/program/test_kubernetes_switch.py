"""ipvs-ingress:kubernetes: the director side alone, or with the cluster side only when a
kubeconfig is at hand (__main__.py under set_mocks)."""

from __future__ import annotations

import pulumi
import pytest

from components.config import ConfigError, load
from tests.program.conftest import (
    DEV_CONFIG,
    PRIVATE_KEY,
    VS_INPUTS,
    VS_TYPE,
    Run,
    dev_config,
    dev_virtual_services,
    run_program,
)

INGRESS = "ipvs-ingress:index:Ingress"
COMMAND = "command:remote:Command"
BOOTSTRAP = "ipvs-ingress:index:DirectorBootstrap"
MISSING = "ipvs-ingress:kubernetes: true, but no kubeconfig (no KUBECONFIG, no ~/.kube/config,"


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """A machine with no kubeconfig anywhere: a fresh HOME, no KUBECONFIG, not in a pod."""
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def kubernetes_types(run: Run) -> list[str]:
    # pulumi-kubernetes types (kubernetes:<group>/<version>:<Kind>, pulumi:providers:kubernetes)
    # and our components that wrap them.
    cluster_side = ("kubernetes", "WebApp", "ExternalIPGuard")
    return [r.typ for r in run.resources if any(word in r.typ for word in cluster_side)]


def test_director_side_only_registers_no_kubernetes_resource(no_cluster):
    run = run_program(DEV_CONFIG, raw={"kubernetes": "false"}, kubeconfig=None)
    assert sorted({r.typ for r in run.resources}) == [INGRESS, VS_TYPE]
    assert kubernetes_types(run) == []


def test_director_side_only_keeps_the_virtual_services_exact_and_unattached(no_cluster):
    run = run_program(DEV_CONFIG, raw={"kubernetes": "false"}, kubeconfig=None)
    expected = dev_virtual_services()
    found = run.of_type(VS_TYPE)
    assert sorted(r.name for r in found) == sorted(expected)
    for reg in found:
        assert {k: reg.inputs[k] for k in VS_INPUTS} == expected[reg.name]
        assert reg.dependencies == []  # no Service to wait for
        assert reg.parent.endswith(f"{INGRESS}::ingress")


def test_director_side_only_exports_no_service(no_cluster):
    run = run_program(DEV_CONFIG, raw={"kubernetes": "false"}, kubeconfig=None)
    assert set(run.outputs) == {"vips", "urls", "virtualServices", "realServerHealth"}
    assert run.outputs["vips"] == ["203.0.113.201", "203.0.113.202", "2001:db8::201"]
    assert run.outputs["virtualServices"][0] == (
        "TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1"
    )
    assert len(run.outputs["virtualServices"]) == 7  # 2 + 2 + 2 real servers, 1 for IPv6


def test_director_side_only_with_bootstrap_waits_for_the_commands_alone(no_cluster):
    run = run_program(
        dev_config(bootstrap=True), raw={"kubernetes": "false"}, private_key=PRIVATE_KEY,
        kubeconfig=None,
    )  # fmt: skip
    assert {r.typ for r in run.resources} == {INGRESS, COMMAND, BOOTSTRAP, VS_TYPE}
    commands = {r.name for r in run.of_type(COMMAND)}
    for reg in run.of_type(VS_TYPE):
        assert {u.rsplit("::", 1)[1] for u in reg.dependencies} == commands


def test_no_kubeconfig_stops_before_any_resource(no_cluster):
    run = Run()
    with pytest.raises(pulumi.RunError) as err:
        run_program(DEV_CONFIG, kubeconfig=None, run=run)
    message = str(err.value)
    assert message.startswith(MISSING) and "\n" not in message
    assert "`pulumi config set ipvs-ingress:kubernetes false`" in message
    assert run.resources == []  # nothing half-declared: the preview stops here


def test_explicit_true_without_kubeconfig_is_the_same_line(no_cluster):
    with pytest.raises(pulumi.RunError) as err:
        run_program(DEV_CONFIG, raw={"kubernetes": "true"}, kubeconfig=None)
    assert str(err.value).startswith(MISSING)


def test_stack_kubeconfig_naming_no_file_is_one_line(no_cluster):
    with pytest.raises(pulumi.RunError) as err:
        run_program(DEV_CONFIG, kubeconfig=str(no_cluster / "k3s.yaml"))
    message = str(err.value)
    assert message.startswith("kubernetes:kubeconfig: '") and "names no kubeconfig file" in message
    assert "\n" not in message


CLUSTER_SIDE = {
    "ipvs-ingress:index:WebApp",
    "kubernetes:apps/v1:Deployment",
    "kubernetes:core/v1:Service",
    "ipvs-ingress:index:ExternalIPGuard",
    "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicy",
    "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicyBinding",
}


def assert_full_program(run: Run) -> None:
    assert {r.typ for r in run.resources} == {INGRESS, VS_TYPE, *CLUSTER_SIDE}
    for reg in run.of_type(VS_TYPE):
        (dependency,) = reg.dependencies
        assert dependency.endswith("::ipvs-ingress:index:WebApp$kubernetes:core/v1:Service::nginx")
    assert run.outputs["service"] == "web-dev/nginx"


def test_kubeconfig_env_file_gives_the_whole_program(no_cluster, monkeypatch):
    config = no_cluster / "cluster.yaml"
    config.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", f"{no_cluster / 'missing'}:{config}")
    assert_full_program(run_program(DEV_CONFIG, kubeconfig=None))


def test_home_kubeconfig_gives_the_whole_program(no_cluster):
    (no_cluster / ".kube").mkdir()
    (no_cluster / ".kube" / "config").write_text("apiVersion: v1\nkind: Config\n")
    assert_full_program(run_program(DEV_CONFIG, raw={"kubernetes": "true"}, kubeconfig=None))


def test_stack_kubeconfig_path_gives_the_whole_program(no_cluster):
    config = no_cluster / "k3s.yaml"
    config.write_text("apiVersion: v1\nkind: Config\n")
    assert_full_program(run_program(DEV_CONFIG, kubeconfig=str(config)))


# --- the key itself, through the config layer -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), (True, True), ("true", True), (False, False), ("false", False)],
)
def test_kubernetes_key_values(value, expected):
    values = {k: v for k, v in DEV_CONFIG.items()}
    if value is not None:
        values["kubernetes"] = value
    assert load(values).kubernetes is expected


@pytest.mark.parametrize("bad", ["yes", "False", 0, [], {"on": True}])
def test_kubernetes_key_that_is_not_a_boolean_is_one_line(bad, no_cluster):
    with pytest.raises(ConfigError) as err:
        load({**DEV_CONFIG, "kubernetes": bad})
    assert str(err.value).startswith(f"ipvs-ingress:kubernetes: {bad!r} is not a boolean: use ")
    assert str(err.value).endswith("false to manage only the director")
    with pytest.raises(pulumi.RunError) as run_err:
        run_program(DEV_CONFIG, raw={"kubernetes": str(bad)}, kubeconfig=None)
    assert str(run_err.value).startswith("ipvs-ingress:kubernetes: ")
    assert "is not a boolean" in str(run_err.value) and "\n" not in str(run_err.value)


def test_external_ip_pool_without_kubernetes_is_refused():
    with pytest.raises(ConfigError) as err:
        load({**DEV_CONFIG, "kubernetes": "false", "externalIPPool": ["198.51.100.0/24"]})
    assert str(err.value) == (
        "ipvs-ingress:externalIPPool: ['198.51.100.0/24'] is set but ipvs-ingress:kubernetes is "
        "false, so no guard is deployed to enforce it: remove ipvs-ingress:externalIPPool or set "
        "ipvs-ingress:kubernetes true"
    )
