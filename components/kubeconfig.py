"""Is there a cluster for pulumi-kubernetes to talk to? Decided at preview, without the network.

pulumi-kubernetes finds its cluster the way kubectl does (client-go's loading rules): the stack's
`kubernetes:kubeconfig` (a path or the kubeconfig itself), else the files listed in KUBECONFIG
(os.pathsep-separated, missing ones skipped; ~/.kube/config is then not read), else
~/.kube/config, else the pod's service account when it runs inside a cluster. With none of them
it fails in the middle of an apply, after the director side may already have changed, so the
program checks first and stops the preview with one line instead. Only presence is checked:
whether the cluster answers is pulumi-kubernetes' own business. find() and problem() are pure
(the environment, the config and the file check are passed in); stack_problem() feeds them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import pulumi
from pulumi.runtime.config import is_config_secret

from components.config import path
from providers.model import _short

# Where the kubelet mounts a pod's service account token (client-go's rest.InClusterConfig).
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_ENV = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")


def has_content(file: str) -> bool:
    """A file with something in it: an empty kubeconfig is no cluster either."""
    try:
        return os.path.isfile(file) and os.path.getsize(file) > 0
    except OSError:
        return False


def find(
    env: Mapping[str, str],
    stack: Mapping[str, str | None],
    usable: Callable[[str], bool] = has_content,
) -> str | None:
    """Where pulumi-kubernetes will find its cluster, in its own order; None if nowhere.

    `env` is the environment, `stack` the stack's kubernetes:* config by bare key (kubeconfig,
    renderYamlToDirectory), `usable(path)` says whether a kubeconfig file is there to read.
    """
    if stack.get("renderYamlToDirectory"):
        return "kubernetes:renderYamlToDirectory (no cluster needed)"
    kubeconfig = (stack.get("kubeconfig") or "").strip()
    if kubeconfig:
        file = _as_path(kubeconfig, env)
        return "kubernetes:kubeconfig" if file is None or usable(file) else None
    listed = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        found = next((p for p in listed if usable(p)), None)
        return f"KUBECONFIG ({found})" if found else None
    home = env.get("HOME")
    if home and usable(os.path.join(home, ".kube", "config")):
        return "~/.kube/config"
    if all(env.get(k) for k in IN_CLUSTER_ENV) and usable(SERVICE_ACCOUNT_TOKEN):
        return "the in-cluster service account"
    return None


def problem(
    env: Mapping[str, str],
    stack: Mapping[str, str | None],
    usable: Callable[[str], bool] = has_content,
    secret: bool = False,
) -> str | None:
    """One line naming what is missing and the fixes, or None when a kubeconfig is at hand.

    `secret`: kubernetes:kubeconfig is a secret, so the line does not echo it.
    """
    if find(env, stack, usable) is not None:
        return None
    kubeconfig = (stack.get("kubeconfig") or "").strip()
    if kubeconfig:
        return (
            f"kubernetes:kubeconfig: {'[secret]' if secret else _short(kubeconfig)} names no "
            "kubeconfig file: give an existing path or the kubeconfig's contents, or `pulumi "
            "config set ipvs-ingress:kubernetes false` to manage only the director"
        )
    looked = (
        f"KUBECONFIG={_short(env['KUBECONFIG'])} lists no file"
        if any(env.get("KUBECONFIG", "").split(os.pathsep))
        else "no KUBECONFIG, no ~/.kube/config"
    )
    return (
        f"{path('kubernetes')}: true, but no kubeconfig ({looked}, no kubernetes:kubeconfig, "
        "not in a pod): set KUBECONFIG, write ~/.kube/config or `pulumi config set "
        "kubernetes:kubeconfig <path>`; or `pulumi config set ipvs-ingress:kubernetes false` "
        "to manage only the director"
    )


def stack_problem() -> str | None:
    """problem() for this process's environment and the running stack's kubernetes:* config."""
    k8s = pulumi.Config("kubernetes")
    return problem(
        os.environ,
        {key: k8s.get(key) for key in ("kubeconfig", "renderYamlToDirectory")},
        secret=is_config_secret("kubernetes:kubeconfig"),
    )


def _as_path(kubeconfig: str, env: Mapping[str, str]) -> str | None:
    """The file a one-line kubernetes:kubeconfig names, ~ expanded as pulumi-kubernetes does;
    None when the value is the kubeconfig itself (YAML over several lines, or JSON)."""
    if "\n" in kubeconfig or kubeconfig.startswith("{"):
        return None
    if kubeconfig == "~" or kubeconfig.startswith("~/"):
        return env.get("HOME", "~") + kubeconfig[1:]
    return kubeconfig
