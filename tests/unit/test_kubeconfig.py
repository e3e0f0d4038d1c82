"""Where pulumi-kubernetes would find its cluster (components/kubeconfig.py), with no network.

The expectations follow client-go's loading rules as documented for kubectl, written out case by
case: the files that exist are a plain set here, not the module's own file check.
"""

from __future__ import annotations

import pytest

from components.kubeconfig import SERVICE_ACCOUNT_TOKEN, find, has_content, problem, stack_problem

CONTENTS = "apiVersion: v1\nkind: Config\nclusters: []\n"
HOME = {"HOME": "/home/ann"}
IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "192.0.2.1", "KUBERNETES_SERVICE_PORT": "443"}


def files(*paths: str):
    return set(paths).__contains__


@pytest.mark.parametrize(
    ("env", "stack", "existing", "expected"),
    [
        # The stack's kubernetes:kubeconfig comes first, as contents or as a path.
        ({}, {"kubeconfig": CONTENTS}, (), "kubernetes:kubeconfig"),
        ({}, {"kubeconfig": '{"apiVersion": "v1", "kind": "Config"}'}, (), "kubernetes:kubeconfig"),
        ({}, {"kubeconfig": "/etc/k3s.yaml"}, ("/etc/k3s.yaml",), "kubernetes:kubeconfig"),
        (HOME, {"kubeconfig": "~/k3s.yaml"}, ("/home/ann/k3s.yaml",), "kubernetes:kubeconfig"),
        # A path that is not there is not rescued by KUBECONFIG: the provider uses the config.
        ({"KUBECONFIG": "/k"}, {"kubeconfig": "/etc/k3s.yaml"}, ("/k",), None),
        ({}, {"kubeconfig": "  "}, (), None),  # blank is unset
        # KUBECONFIG: a list; missing entries skipped; ~/.kube/config then never read.
        ({"KUBECONFIG": "/a:/b"}, {}, ("/b",), "KUBECONFIG (/b)"),
        ({"KUBECONFIG": "/a:/b", **HOME}, {}, ("/home/ann/.kube/config",), None),
        ({"KUBECONFIG": "", **HOME}, {}, ("/home/ann/.kube/config",), "~/.kube/config"),
        ({"KUBECONFIG": "::", **HOME}, {}, ("/home/ann/.kube/config",), "~/.kube/config"),
        (HOME, {}, ("/home/ann/.kube/config",), "~/.kube/config"),
        (HOME, {}, ("/root/.kube/config",), None),  # another user's file is not ours
        ({}, {}, ("/.kube/config",), None),  # no HOME: no default file
        # In a pod: both variables and the mounted token.
        (IN_CLUSTER, {}, (SERVICE_ACCOUNT_TOKEN,), "the in-cluster service account"),
        (IN_CLUSTER, {}, (), None),
        ({"KUBERNETES_SERVICE_HOST": "192.0.2.1"}, {}, (SERVICE_ACCOUNT_TOKEN,), None),
        # Rendering YAML to a directory needs no cluster at all.
        (
            {},
            {"renderYamlToDirectory": "out"},
            (),
            "kubernetes:renderYamlToDirectory (no cluster needed)",
        ),  # fmt: skip
        ({}, {"kubeconfig": None, "renderYamlToDirectory": None}, (), None),
    ],
)
def test_found_in_client_go_order(env, stack, existing, expected):
    assert find(env, stack, files(*existing)) == expected


def test_no_problem_when_found():
    assert problem(HOME, {}, files("/home/ann/.kube/config")) is None
    assert problem({}, {"kubeconfig": CONTENTS}, files()) is None


def test_nothing_at_all_is_one_line_with_every_fix():
    message = problem(HOME, {"kubeconfig": None}, files())
    assert message == (
        "ipvs-ingress:kubernetes: true, but no kubeconfig (no KUBECONFIG, no ~/.kube/config, no "
        "kubernetes:kubeconfig, not in a pod): set KUBECONFIG, write ~/.kube/config or `pulumi "
        "config set kubernetes:kubeconfig <path>`; or `pulumi config set ipvs-ingress:kubernetes "
        "false` to manage only the director"
    )


def test_kubeconfig_listing_no_file_is_named_and_bounded():
    listed = ":".join(f"/nonexistent/{i}/config" for i in range(200))
    message = problem({"KUBECONFIG": listed}, {}, files())
    # The value is cut to 40 characters: the line stays bounded however long KUBECONFIG is.
    assert message.startswith(
        "ipvs-ingress:kubernetes: true, but no kubeconfig (KUBECONFIG='/nonexistent/0/config:/no"
        "nexistent/1... lists no file, no kubernetes:kubeconfig, not in a pod): set KUBECONFIG"
    )
    assert "\n" not in message and len(message) <= 340


def test_stack_kubeconfig_naming_no_file_is_named():
    message = problem({}, {"kubeconfig": "/etc/k3s.yml"}, files("/etc/k3s.yaml"))
    assert message == (
        "kubernetes:kubeconfig: '/etc/k3s.yml' names no kubeconfig file: give an existing path "
        "or the kubeconfig's contents, or `pulumi config set ipvs-ingress:kubernetes false` to "
        "manage only the director"
    )


def test_secret_stack_kubeconfig_is_not_echoed():
    value = "YXBpVmVyc2lvbjogdjEKa2luZDogQ29uZmln"  # base64 of a kubeconfig: no file, one line
    message = problem({}, {"kubeconfig": value}, files(), secret=True)
    assert message.startswith("kubernetes:kubeconfig: [secret] names no kubeconfig file: ")
    assert value[:8] not in message


def test_has_content_on_real_files(tmp_path):
    full, empty = tmp_path / "config", tmp_path / "empty"
    full.write_text(CONTENTS)
    empty.write_text("")
    assert has_content(str(full))
    assert not has_content(str(empty))  # an empty kubeconfig configures no cluster
    assert not has_content(str(tmp_path))  # a directory
    assert not has_content(str(tmp_path / "missing"))
    assert find({"KUBECONFIG": f"{empty}:{full}"}, {}) == f"KUBECONFIG ({full})"
    assert find({"HOME": str(tmp_path)}, {}) is None


@pytest.fixture
def stack_config():
    """Set the running stack's config as the engine would; cleared afterwards."""
    from pulumi.runtime import set_all_config

    yield set_all_config
    set_all_config({}, [])


def test_stack_problem_reads_the_stack_and_hides_a_secret(stack_config, monkeypatch, tmp_path):
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    value = "YXBpVmVyc2lvbjogdjEKa2luZDogQ29uZmln"
    stack_config({"kubernetes:kubeconfig": value}, ["kubernetes:kubeconfig"])
    assert stack_problem().startswith("kubernetes:kubeconfig: [secret] names no kubeconfig file")
    stack_config({"kubernetes:kubeconfig": value}, [])
    assert stack_problem().startswith(f"kubernetes:kubeconfig: '{value}' names no")
    stack_config({"kubernetes:kubeconfig": CONTENTS}, ["kubernetes:kubeconfig"])
    assert stack_problem() is None
    stack_config({}, [])
    assert stack_problem().startswith("ipvs-ingress:kubernetes: true, but no kubeconfig (no ")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    (tmp_path / "config").write_text(CONTENTS)
    assert stack_problem() is None
