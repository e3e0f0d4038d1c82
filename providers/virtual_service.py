"""The VirtualService dynamic resource: one IPVS virtual service (VIP:port/protocol) on a director.

check and diff are pure (no SSH), so `pulumi preview` works in a pull request with no route to
the director. create/update/read/delete go through one pooled agent session per director.
The SSH private key comes from the stack config in `configure`, so it is never an attribute of
the pickled provider, never a resource input, and never an output.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    ConfigureRequest,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

from providers import model
from providers.transport import POOL, DirectorError

log = logging.getLogger("ipvs_ingress.provider")
PRIVATE_KEY_CONFIG = "ipvs-ingress:sshPrivateKey"
_UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"  # pulumi.runtime.rpc.UNKNOWN, during previews


def _is_unknown(value: object) -> bool:
    return value == _UNKNOWN or isinstance(value, pulumi.Output)


class VirtualServiceProvider(ResourceProvider):
    serialize_as_secret_always = False  # nothing secret is captured: the key comes via configure

    def configure(self, req: ConfigureRequest) -> None:
        # Runs in the provider process only, after unpickling.
        self._private_key = req.config.get(PRIVATE_KEY_CONFIG)

    def __getstate__(self) -> dict:
        # Whatever pickles this provider (the SDK, in any process), the key stays behind.
        return {k: v for k, v in self.__dict__.items() if k != "_private_key"}

    # -- pure: no SSH --
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        problems = model.check_virtual_service(news, unknown=_is_unknown)
        if problems:
            return CheckResult(news, [CheckFailure(p.field, p.message) for p in problems])
        if any(_is_unknown(v) for v in news.values()):
            return CheckResult(news, [])
        director, spec = model.parse_virtual_service(news)
        return CheckResult(model.to_props(director, spec), [])

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = model.changed_keys(_normalized(olds), _normalized(news))
        replaces = [k for k in changed if k in model.REPLACE_KEYS]
        # Drift that refresh found and the inputs cannot show (e.g. a forwarding method) is repaired too.
        drift = olds.get("inSync") is False
        # Same VIP:port/protocol under another director address (a new SSH port, an IP that
        # became a name) may be the same kernel: delete first, or the new resource would adopt
        # the old service and the old one's delete would then remove it.
        same_service = not {"vip", "port", "protocol"} & set(changed)
        return DiffResult(
            changes=bool(changed) or drift,
            replaces=replaces,
            delete_before_replace=bool(replaces) and same_service,
        )

    # -- through the director --
    # create claims only what is free; read, update and delete carry the resource's id, so the
    # stack's own state holds the service: they adopt it if the director's record was lost.
    def create(self, props: dict[str, Any]) -> CreateResult:
        director, spec = model.parse_virtual_service(props)
        result = self._apply(director, spec, adopt=False)
        return CreateResult(
            f"{director.host}:{director.port}/{spec.key}", _outputs(director, spec, result)
        )

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        director, spec = model.parse_virtual_service(news)
        result = self._apply(director, spec, adopt=True)
        return UpdateResult(_outputs(director, spec, result))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        director, spec = model.parse_virtual_service(_normalized(props))
        result = self._session(director).request("read", **_where(director, spec))
        if result["live"] is None or not result["owned"]:
            return ReadResult("", {})  # gone from the director: the engine drops it from state
        return ReadResult(id_, _outputs(director, spec, result))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        director, spec = model.parse_virtual_service(_normalized(props))
        self._session(director).request("delete", **_where(director, spec))

    def _apply(self, director: model.Director, spec: model.VirtualServiceSpec, adopt: bool) -> dict:
        session = self._session(director)
        result = session.request(
            "apply", spec=model.spec_to_dict(spec), interface=director.interface, adopt=adopt
        )
        log.info(
            "applied %s on %s: %d kernel change(s) %s",
            spec.key,
            director.label,
            result["touched"],
            result["changes"],
        )
        return result

    def _session(self, director: model.Director):
        key = getattr(self, "_private_key", None)
        if not key:
            raise DirectorError(
                f"{PRIVATE_KEY_CONFIG} is not set, so director {director.host} cannot be reached: "
                "run 'pulumi config set --secret sshPrivateKey < ~/.ssh/id_ed25519'"
            )
        return POOL.session(director, key)


def _normalized(props: dict[str, Any]) -> dict[str, Any]:
    """Input-shaped, normalized view of stored props (numbers from gRPC arrive as floats)."""
    inputs = {k: props[k] for k in model.INPUT_KEYS if k in props}
    try:
        return model.to_props(*model.parse_virtual_service(inputs))
    except model.InvalidSpec:
        return inputs


def _where(director: model.Director, spec: model.VirtualServiceSpec) -> dict:
    """A read or delete request: the service, this stack as its owner, adopting if unrecorded."""
    return {
        "protocol": spec.protocol,
        "vip": spec.vip,
        "port": spec.port,
        "interface": director.interface,
        "owner": spec.owner,
        "adopt": True,
    }


def _outputs(director: model.Director, spec: model.VirtualServiceSpec, result: dict) -> dict:
    """Inputs as applied, plus what the director reports after the change or on refresh.

    `realServers`, `scheduler` and `persistenceSeconds` are the kernel's values, so a refresh
    that finds drift shows it as a diff against the program's inputs; `vipBound` (the VIP on
    director.interface) and `ipForward` are part of `inSync`; the next `up` repairs all of it.
    """
    outs = model.to_props(director, spec)
    bound, forward = bool(result.get("vipBound")), bool(result.get("ipForward"))
    outs.update(vipBound=bound, ipForward=forward)
    live = result.get("live")
    if live is None:
        outs.update(realServers=[], ipvsadm=[], inSync=False)
        return outs
    state = model.LiveService.from_dict(live)
    outs.update(
        scheduler=state.scheduler,
        persistenceSeconds=state.persistence_seconds,
        realServers=[
            {"address": d.address, "weight": d.weight}
            for d in state.dests
            if d.forwarding == model.ROUTE
        ],
        ipvsadm=model.ipvsadm_lines(state),
        inSync=not model.plan(state, spec) and bound and forward,
    )
    return outs


class VirtualService(Resource, module="ipvs", name="VirtualService"):
    """One IPVS virtual service in Direct-Routing mode, realized on the director over SSH."""

    vip: pulumi.Output[str]
    port: pulumi.Output[int]
    protocol: pulumi.Output[str]
    ipvsadm: pulumi.Output[list[str]]

    def __init__(
        self, name: str, props: dict[str, Any], opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__(
            VirtualServiceProvider(),
            name,
            {**props, "ipvsadm": None, "inSync": None, "vipBound": None, "ipForward": None},
            opts,
        )


# The SDK's provider server answers every exception with a full traceback. A DirectorError is an
# expected, explained failure (unreachable, wrong key, missing IPVS): show its one line only.
_format_exc = traceback.format_exc


def _one_line_for_director_errors(*args, **kwargs) -> str:
    err = sys.exc_info()[1]
    if isinstance(err, DirectorError | model.InvalidSpec):
        return str(err)
    return _format_exc(*args, **kwargs)


traceback.format_exc = _one_line_for_director_errors
