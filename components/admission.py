"""The externalIP guard (CVE-2020-8554): only this stack's Service may claim its VIPs.

Anyone who may create a Service can list any address in spec.externalIPs, and kube-proxy then
captures that address's traffic on every node: a VIP of this stack, claimed by another Service,
is intercepted. A ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) and its binding
deny that at the API server. The CEL uses the Kubernetes ip() and cidr() libraries, so that
`2001:DB8::201` cannot pass for `2001:db8::201`; the API server accepts them in new expressions
from Kubernetes 1.31 (introduced in 1.30, one release behind for rollback safety).

Updates are judged by what they add: an address the old object already listed passes, as with
the DenyServiceExternalIPs admission plugin, so a Service created before the guard can still be
edited, have its finalizers removed and be deleted. Addresses that ip() cannot read (leading
zeros, IPv4-mapped IPv6) are refused too: kube-proxy would read them, the guard could not.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pulumi
from pulumi_kubernetes.admissionregistration.v1 import (
    ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
)

from components.config import PROJECT, StackConfig

OWNER_ANNOTATION = "ipvs-ingress/owner"
LABELS = {
    "app.kubernetes.io/part-of": PROJECT,
    "app.kubernetes.io/component": "external-ip-guard",
    "app.kubernetes.io/managed-by": "pulumi",
}


def guard_name(owner: str) -> str:
    """A cluster-wide name per stack ("<project>/<stack>"), e.g. ipvs-ingress-dev-3f2a9c1e.

    Stack names may hold capitals, '_' and '.', which the readable part folds away; the hash
    of the exact owner keeps `Dev` and `dev` (or `a_b` and `a-b`) apart.
    """
    readable = re.sub(r"[^a-z0-9]+", "-", owner.lower()).strip("-")[:40].rstrip("-")
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]
    return f"{readable}-external-ips-{digest}" if readable else f"external-ips-{digest}"


def _cel(value: str | list[str]) -> str:
    """A CEL literal. JSON's string and list syntax is CEL's, for these plain ASCII values."""
    return json.dumps(value, ensure_ascii=True)


def _message(before: str, listed: str, after: str) -> str:
    """A messageExpression: `before`, the first address of variables.<listed>, `after`, and
    how many more there are. The constant parts are CEL literals, whatever they hold."""
    more = (
        f"(size(variables.{listed}) > 1 ? ' (and ' + string(size(variables.{listed}) - 1)"
        " + ' more)' : '')"
    )
    return f"{_cel(before)} + variables.{listed}[0] + {_cel(after)} + {more}"


def policy_spec(cfg: StackConfig, owner: str) -> dict[str, Any]:
    """The ValidatingAdmissionPolicy's spec: its variables, in order, then its validations."""
    service = f"{cfg.app.namespace}/{cfg.app.name}"
    vips = [vip.address for vip in cfg.vips]  # canonical already (the config layer's form)
    guard = f"the ipvs-ingress externalIP guard of stack {owner}"
    variables = [
        ("ips", "has(object.spec.externalIPs) ? object.spec.externalIPs : []"),
        (
            "previous",
            # oldObject is null on CREATE (the policy matches CREATE and UPDATE only).
            'request.operation == "UPDATE" && has(oldObject.spec.externalIPs)'
            " ? oldObject.spec.externalIPs : []",
        ),
        # Only what this request adds is judged (see the module docstring).
        ("added", "variables.ips.filter(a, !(a in variables.previous))"),
        ("unreadable", "variables.added.filter(a, !isIP(a))"),
        (
            "ours",
            f"request.namespace == {_cel(cfg.app.namespace)}"
            f" && request.name == {_cel(cfg.app.name)}",
        ),
        ("vips", _cel(vips)),
        (
            "claimed",
            "variables.ours ? [] : variables.added.filter(a, isIP(a)"
            " && string(ip(a)) in variables.vips)",
        ),
    ]
    validations = [
        {
            "expression": "size(variables.unreadable) == 0",
            "messageExpression": _message(
                "spec.externalIPs: ",
                "unreadable",
                f" is not in standard form (leading zeros or IPv4-mapped IPv6), so {guard}"
                " cannot check it: write it plainly, e.g. 203.0.113.7 or 2001:db8::7",
            ),
            "message": f"spec.externalIPs: an address is not in standard form, so {guard} cannot check it: write each address plainly",  # noqa: E501
            "reason": "Forbidden",
        },
        {
            "expression": "size(variables.claimed) == 0",
            "messageExpression": _message(
                "spec.externalIPs: ",
                "claimed",
                f" is a VIP of ipvs-ingress stack {owner}, reserved for Service {service}"
                " (CVE-2020-8554): remove it from this Service",
            ),
            "message": f"spec.externalIPs: the VIPs of ipvs-ingress stack {owner} ({', '.join(vips)}) are reserved for Service {service} (CVE-2020-8554): remove them from this Service",  # noqa: E501
            "reason": "Forbidden",
        },
    ]
    if cfg.guard.pool:
        pool = ", ".join(cfg.guard.pool)
        variables += [
            ("pool", _cel(list(cfg.guard.pool))),
            (
                "outside",
                "variables.added.filter(a, isIP(a) && !(string(ip(a)) in variables.vips)"
                " && !variables.pool.exists(c, cidr(c).containsIP(ip(a))))",
            ),
        ]
        validations.append(
            {
                "expression": "size(variables.outside) == 0",
                "messageExpression": _message(
                    "spec.externalIPs: ",
                    "outside",
                    f" is outside the externalIP pool ({pool}) that {guard} allows: use an"
                    " address from the pool, or have it added to ipvs-ingress:externalIPPool",
                ),
                "message": f"spec.externalIPs: an address is outside the externalIP pool ({pool}) that {guard} allows: use an address from the pool",  # noqa: E501
                "reason": "Forbidden",
            }
        )
    return {
        # An error (an expression the server cannot compile or evaluate) denies: a guard that
        # fails open is no guard.
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                {
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": ["services"],
                }
            ]
        },
        # Most Services have no externalIPs: they never reach the expressions.
        "matchConditions": [
            {
                "name": "has-external-ips",
                "expression": "has(object.spec.externalIPs) && size(object.spec.externalIPs) > 0",
            }
        ],
        "variables": [{"name": n, "expression": e} for n, e in variables],
        "validations": validations,
    }


def binding_spec(policy_name: pulumi.Input[str]) -> dict[str, Any]:
    # No matchResources: every namespace, since an attacker picks the one they may write to.
    return {"policyName": policy_name, "validationActions": ["Deny"]}


class ExternalIPGuard(pulumi.ComponentResource):
    policy: ValidatingAdmissionPolicy
    binding: ValidatingAdmissionPolicyBinding
    policy_name: pulumi.Output[str]

    def __init__(
        self, name: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("ipvs-ingress:index:ExternalIPGuard", name, None, opts)
        owner = f"{pulumi.get_project()}/{pulumi.get_stack()}"
        metadata = {
            "name": guard_name(owner),
            "labels": LABELS,
            "annotations": {OWNER_ANNOTATION: owner},
        }
        child = pulumi.ResourceOptions(parent=self)
        self.policy = ValidatingAdmissionPolicy(
            f"{name}-policy", metadata=metadata, spec=policy_spec(cfg, owner), opts=child
        )
        # Bound by the policy's output name, so the binding is created after the policy.
        self.binding = ValidatingAdmissionPolicyBinding(
            f"{name}-binding",
            metadata=metadata,
            spec=binding_spec(self.policy.metadata.name),
            opts=child,
        )
        self.policy_name = self.policy.metadata.name
        self.register_outputs({"policy": self.policy_name})
