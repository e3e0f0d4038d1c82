"""The VirtualService dynamic resource: one IPVS virtual service (VIP:port/protocol) on a director.

check and diff are pure (no SSH), so `pulumi preview` works in a pull request with no route to
the director. create/update/read/delete are requests to the director's runtime, over one pooled
SSH session per director.
The SSH private key comes from the stack config in `configure`, so it is never an attribute of
the pickled provider, never a resource input, and never an output.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import sys
import time
import traceback
import types
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi.output
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
from pulumi.runtime import rpc

from providers import model
from providers.transport import POOL, DirectorError

log = logging.getLogger("ipvs_ingress.provider")
PRIVATE_KEY_CONFIG = "ipvs-ingress:sshPrivateKey"
MAX_REASON = 300  # a check failure is one line the engine prints; never a wall of text


def _is_unknown(value: object) -> bool:
    """A computed input during a preview, as the SDK delivers it to Check and Diff.

    The SDK deserializes with keep_unknowns, so unknowns are `pulumi.output.Unknown` objects;
    the raw sentinel string is accepted too, in case a value arrives unconverted.
    """
    return isinstance(value, pulumi.output.Unknown) or (
        isinstance(value, str) and value == rpc.UNKNOWN
    )


def _has_unknown(value: object) -> bool:
    """True if `value` is unknown or holds one anywhere inside (director.host, realServers[i])."""
    if _is_unknown(value):
        return True
    if isinstance(value, Mapping):
        return any(_has_unknown(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_unknown(v) for v in value)
    return False


class VirtualServiceProvider(ResourceProvider):
    serialize_as_secret_always = False  # nothing secret is captured: the key comes via configure

    def configure(self, req: ConfigureRequest) -> None:
        # Runs in the provider process only, after unpickling.
        self._private_key = req.config.get(PRIVATE_KEY_CONFIG)

    def __getstate__(self) -> dict:
        # Whatever pickles this provider (the SDK, in any process), the key stays behind.
        return {k: v for k, v in self.__dict__.items() if k != "_private_key"}

    # -- pure: no SSH --
    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        # Stored state from before owners existed has none; new inputs always carry one.
        problems = model.check_virtual_service(news, unknown=_is_unknown, need_owner=True)
        problems += _taken_over(olds, news)
        if _is_unknown(news.get("director")):
            # A director that is computed is not yet known, not "not an object".
            problems = [p for p in problems if p.field != "director"]
        if problems:
            return CheckResult(
                news, [CheckFailure(p.field, _one_line(p.message)) for p in problems]
            )
        if _has_unknown([news.get(k) for k in model.INPUT_KEYS]):
            # Preview: the known parts passed; the rest is checked again once it is known.
            return CheckResult(news, [])
        director, spec = model.parse_virtual_service(news)
        return CheckResult(_props(director, spec, news), [])

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        # Drift that refresh found and the inputs cannot show (e.g. a forwarding method) is repaired too.
        drift = olds.get("inSync") is False
        old, new = _parsed_inputs(olds), _parsed_inputs(news)
        if old is None or new is None:
            return _diff_unparsed(olds, news, drift)
        changed = model.changed_keys(old, new)
        replaces = [k for k in changed if k in model.REPLACE_KEYS]
        return DiffResult(
            changes=bool(changed) or drift,
            replaces=replaces,
            delete_before_replace=_delete_first(replaces),
        )

    # -- through the director --
    # create claims only what is free; read, update and delete carry the resource's id, so the
    # stack's own state holds the service: they adopt it if the director's record was lost.
    def create(self, props: dict[str, Any]) -> CreateResult:
        director, spec = model.parse_virtual_service(props)
        result = self._apply(director, spec, props, adopt=False)
        return CreateResult(
            f"{director.host}:{director.port}/{spec.key}",
            _outputs(director, spec, result, model.vrrp_of(props)),
        )

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        director, spec = model.parse_virtual_service(news)
        # A renamed stack or project: the director records the service under the old name.
        former = olds.get("owner") if isinstance(olds.get("owner"), str) else ""
        result = self._apply(director, spec, news, adopt=True, former=former)
        return UpdateResult(_outputs(director, spec, result, model.vrrp_of(news)))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        inputs = _normalized(props)
        director, spec = model.parse_virtual_service(inputs)
        result = self._session(director).request("read", **_where(director, spec, inputs))
        if result["live"] is None or not result["owned"]:
            return ReadResult("", {})  # gone from the director: the engine drops it from state
        return ReadResult(id_, _outputs(director, spec, result, model.vrrp_of(inputs)))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        inputs = _normalized(props)
        director, spec = model.parse_virtual_service(inputs)
        self._session(director).request("delete", **_where(director, spec, inputs))

    def _apply(
        self,
        director: model.Director,
        spec: model.VirtualServiceSpec,
        props: dict[str, Any],
        adopt: bool,
        former="",
    ) -> dict:
        session = self._session(director)
        health, vrrp = model.health_of(props), model.vrrp_of(props)
        result = session.request(
            "apply",
            spec=model.spec_to_dict(spec),
            interface=director.interface,
            adopt=adopt,
            repair=model.repair_of(props),  # recorded: whether the director's runtime repairs it
            # Recorded too: how the runtime checks the real servers (none sent: no check).
            **({"health": health} if health is not None else {}),
            # Several directors: keepalived holds the VIP, the runtime renders its group from it.
            **({"vrrp": vrrp} if vrrp is not None else {}),
            **({"formerOwner": former} if former and former != spec.owner else {}),
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


_OWN_CHECKS = ("health", "vrrp")  # left out of the parse of stored props: see _normalized


def _where_on(props: object) -> tuple[str, int] | None:
    """(host, port) of a props' director, None when not known (unknown, absent, malformed)."""
    d = props.get("director") if isinstance(props, Mapping) else None
    host, port = (d.get("host"), d.get("port", 22)) if isinstance(d, Mapping) else (None, None)
    if not isinstance(host, str) or _is_unknown(host) or isinstance(port, bool):
        return None
    return (host, int(port)) if isinstance(port, int | float) and port == int(port) else None


def _taken_over(olds: dict[str, Any], news: dict[str, Any]) -> list[model.Problem]:
    """A one-director resource (no vrrp) that the program now declares on another director with
    vrrp: `director: X` became `directors: [Y, ..., X]`, and the first listed director's
    resources carry the one-director names (components/ingress.py aliases). The engine would
    replace X's services by Y's, then delete the old ones on X: the services X's own new
    resources hold there. Refused; the fix is to list X first."""
    if not isinstance(olds, Mapping) or olds.get("vrrp") is not None:
        return []
    if news.get("vrrp") is None or _is_unknown(news.get("vrrp")):
        return []
    was, now = _where_on(olds), _where_on(news)
    if was is None or now is None or was == now:
        return []
    before, after = (f"{h}:{p}" if p != 22 else h for h, p in (was, now))
    return [
        model.Problem(
            "director.host",
            f"{model._short(after)} would replace former ipvs-ingress:director {model._short(before)} for this service, deleting it there: list {model._short(before)} first in ipvs-ingress:directors (or move ipvs-ingress:director first, then add directors)",  # fmt: skip
        )
    ]


def _normalized(props: dict[str, Any]) -> dict[str, Any]:
    """Input-shaped, normalized view of stored props (numbers from gRPC arrive as floats), for
    read and delete. Without `health`: neither sends it (read's outputs carry the recorded
    one), so a malformed one in state never blocks a refresh or a destroy."""
    inputs = {k: props[k] for k in model.INPUT_KEYS if k in props and k not in _OWN_CHECKS}
    try:
        out = _props(*model.parse_virtual_service(inputs), inputs)
    except model.InvalidSpec:
        out = inputs
    # `vrrp` is sent when it is sound; one that is not never blocks a refresh or a destroy.
    vrrp = props.get("vrrp")
    vrrp = model.check_vrrp(vrrp)[0] if vrrp is not None and not _has_unknown(vrrp) else None
    return {**out, **({"vrrp": vrrp} if vrrp is not None else {})}


def _parsed_inputs(props: dict[str, Any]) -> dict[str, Any] | None:
    """Normalized inputs, or None when they hold unknowns (preview) or do not parse."""
    inputs = {k: props[k] for k in model.INPUT_KEYS if k in props}
    if _has_unknown(inputs):
        return None
    try:
        return _props(*model.parse_virtual_service(inputs), inputs)
    except model.InvalidSpec:
        return None


def _props(director: model.Director, spec: model.VirtualServiceSpec, inputs: Mapping) -> dict:
    """The normalized inputs of a parsed service: its spec, `repair`, `health` and `vrrp`."""
    return model.to_props(
        director, spec, model.repair_of(inputs), model.health_of(inputs), model.vrrp_of(inputs)
    )


def _delete_first(replaces: list[str]) -> bool:
    # Same VIP:port/protocol under another director address (a new SSH port, an IP that became
    # a name) may be the same kernel: delete first, or the new resource would adopt the old
    # service and the old one's delete would then remove it.
    return bool(replaces) and not {"vip", "port", "protocol"} & set(replaces)


_UNSEEN = object()  # stands for a value that is unknown in a preview


def _diff_unparsed(olds: dict[str, Any], news: dict[str, Any], drift: bool) -> DiffResult:
    """Diff when a side cannot be normalized: unknown values in a preview, or junk.

    An unknown value may turn out different, so it counts as a change, and as a replacement if
    it is one of the identity keys. Known identity values are compared in canonical form, so a
    preview does not announce a replacement that the apply will not make.
    """
    old_id, new_id = _identity(olds), _identity(news)
    replaces = [k for k in model.REPLACE_KEYS if new_id[k] is _UNSEEN or new_id[k] != old_id[k]]
    # State from before the repair input has none: it meant true, as an explicit true does.
    inputs = [{k: p.get(k, True if k == "repair" else None) for k in model.INPUT_KEYS} for p in (olds, news)]  # fmt: skip
    changes = bool(replaces) or drift or _has_unknown(inputs[1]) or inputs[0] != inputs[1]
    return DiffResult(
        changes=changes, replaces=replaces, delete_before_replace=_delete_first(replaces)
    )


def _identity(props: Mapping[str, Any]) -> dict[str, Any]:
    """The replace keys of (possibly unknown or invalid) props, each in canonical form."""
    director = props.get("director")
    if _is_unknown(director):
        host = port = _UNSEEN
    else:
        director = director if isinstance(director, Mapping) else {}
        host, port = _canonical_host(director.get("host")), director.get("port", 22)
    raw = {
        "director.host": host,
        "director.port": port,
        "vip": props.get("vip"),
        "port": props.get("port"),
        "protocol": props.get("protocol", "tcp"),
    }
    return {k: _canonical(v) for k, v in raw.items()}


def _canonical_host(host: Any) -> Any:
    # The model's one spelling (case, trailing dot, IPv6 form), as a parsed diff compares it.
    if _has_unknown(host):
        return host
    try:
        return model.canonical_host(host)
    except ValueError:
        return host  # invalid: compared as given


def _canonical(value: Any) -> Any:
    if value is _UNSEEN or _has_unknown(value):
        return _UNSEEN
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value.lower()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping | list):
        return repr(value)  # junk: compared as text, never hashed or ordered
    return value


def _one_line(reason: str) -> str:
    """A failure reason as one bounded line; the middle goes, so field and fix both stay."""
    text = " ".join(str(reason).split())
    if len(text) <= MAX_REASON:
        return text
    keep = (MAX_REASON - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


def _where(director: model.Director, spec: model.VirtualServiceSpec, inputs: Mapping) -> dict:
    """A read or delete request: the service, this stack as its owner, adopting if unrecorded,
    and its `vrrp` part (keepalived, not the agent, holds such a VIP)."""
    vrrp = model.vrrp_of(inputs)
    return {
        **({"vrrp": vrrp} if vrrp is not None else {}),
        "protocol": spec.protocol,
        "vip": spec.vip,
        "port": spec.port,
        "interface": director.interface,
        "owner": spec.owner,
        "adopt": True,
    }


def _outputs(
    director: model.Director,
    spec: model.VirtualServiceSpec,
    result: dict,
    vrrp: dict | None = None,
) -> dict:
    """Inputs as applied, plus what the director reports after the change or on refresh.

    `realServers`, `scheduler` and `persistenceSeconds` are the kernel's values, so a refresh
    that finds drift shows it as a diff against the program's inputs; `vipBound` (the VIP on
    director.interface) and `ipForward` are part of `inSync`; the next `up` repairs all of it.
    `desired` is the table the director records for this service (what its runtime restores
    and, with `repair` on, keeps): ipvsadm lines next to the live `ipvsadm`; a record that is
    missing, pending or not this spec is drift too, as is a recorded `repair` other than the
    input's (shown as a change of `repair`). So a stack with repair off still sees its drift.
    `health` is the recorded health check too (none recorded: no `health`, a change of it).
    With `vrrp` (several directors) keepalived holds the VIP on one director at a time: a
    director without it is in sync; `vipHeld` says whether this one held it (None: the director
    did not say). `vrrp` is the recorded one when the reply carries it, else the input's.
    """
    recorded_health = result.get("health")
    if recorded_health is not None:  # the record's, as the agent checked it: normalized again
        recorded_health = model.check_health(recorded_health, spec.protocol)[0]
    if "vrrp" in result:
        vrrp = None if result["vrrp"] is None else model.check_vrrp(result["vrrp"])[0]
    repair = result.get("repair", True) is not False
    outs = model.to_props(director, spec, repair, recorded_health, vrrp)
    held = result.get("vipBound")
    bound, forward = bool(held), bool(result.get("ipForward"))
    desired = [str(line) for line in result.get("desired") or []]
    recorded = desired == model.ipvsadm_lines(spec) and result.get("recordState") == "applied"
    outs.update(vipBound=bound, ipForward=forward, desired=desired)
    outs["vipHeld"] = held if isinstance(held, bool) else None
    bound = bound or vrrp is not None  # the backup holds no VIP, and is in sync
    live = result.get("live")
    if live is None:
        outs.update(realServers=[], ipvsadm=[], inSync=False)
        return outs
    state = model.LiveService.from_dict(live)
    # Health (the director's runtime): a drained real server's weight 0 is what the director
    # should hold, not drift: shown with its configured weight, judged against health's weights.
    rs_health = _rs_health(result.get("realServerHealth"))
    effective = {(h["address"], h["port"]): h["weight"] for h in rs_health}
    target = dataclasses.replace(
        spec,
        real_servers=tuple(
            dataclasses.replace(r, weight=effective.get((r.address, spec.port), r.weight))
            for r in spec.real_servers
        ),
    )
    configured = {r.address: r.weight for r in spec.real_servers}

    def shown(d: model.LiveDest) -> int:
        held = effective.get((d.address, d.port))  # None: no health said
        drained = held is not None and held == d.weight != configured.get(d.address)
        return configured[d.address] if drained and d.address in configured else d.weight

    outs["realServerHealth"] = rs_health
    outs.update(
        scheduler=state.scheduler,
        persistenceSeconds=state.persistence_seconds,
        realServers=[
            {"address": d.address, "weight": shown(d)}
            for d in state.dests
            if d.forwarding == model.ROUTE and d.port == spec.port  # the rest: ipvsadm, inSync
        ],
        ipvsadm=model.ipvsadm_lines(state),
        inSync=not model.plan(state, target) and bound and forward and recorded,
    )
    return outs


def _rs_health(raw: Any) -> list[dict]:
    """The director's health per real server, as outputs: address, port, state (up, drained,
    held: failing but kept in service by depoolThreshold, unprobed, unchecked), since (UTC),
    reason, weight (what health has the director hold). Entries not of that form are dropped."""
    out = []
    for h in raw if isinstance(raw, list) else []:
        try:
            since = h.get("since")
            item = {
                "address": str(h["address"]),
                "port": int(h["port"]),
                "state": str(h["state"]),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
                if since
                else None,  # fmt: skip
                "reason": _one_line(str(h.get("reason") or "")),
                "weight": int(h["weight"]),
            }
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError, OSError):
            continue
        out.append(item)
    return out


class VirtualService(Resource, module="ipvs", name="VirtualService"):
    """One IPVS virtual service in Direct-Routing mode, realized on the director over SSH."""

    vip: pulumi.Output[str]
    port: pulumi.Output[int]
    protocol: pulumi.Output[str]
    ipvsadm: pulumi.Output[list[str]]
    desired: pulumi.Output[list[str]]
    vipHeld: pulumi.Output[bool | None]  # noqa: N815 (the output's name)
    realServerHealth: pulumi.Output[list[dict]]  # noqa: N815 (the output's name)

    def __init__(
        self, name: str, props: dict[str, Any], opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__(
            VirtualServiceProvider(),
            name,
            {
                **props,
                **dict.fromkeys(
                    (
                        "ipvsadm",
                        "desired",
                        "inSync",
                        "vipBound",
                        "vipHeld",
                        "ipForward",
                        "realServerHealth",
                    )
                ),
            },
            opts,
        )


class _ServerTraceback:
    """The `traceback` module as the SDK's provider server sees it, with one difference.

    The server (pulumi/dynamic/__main__.py, `_abort_with_traceback`) reports every exception
    from Check/Diff/Create/Read/Update/Delete as `traceback.format_exc()`. A DirectorError or
    InvalidSpec is an expected, explained failure (unreachable, wrong key, bad input): its one
    line is the whole message. Anything else keeps its full traceback.
    """

    def __init__(self, real: types.ModuleType):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def format_exc(self, *args: Any, **kwargs: Any) -> str:
        err = sys.exc_info()[1]
        if isinstance(err, DirectorError | model.InvalidSpec):
            return _one_line(str(err))  # bounded too: a message may quote a long value
        return self._real.format_exc(*args, **kwargs)


def _scope_one_line_errors_to_the_provider_server() -> None:
    """Install _ServerTraceback as the provider server module's own `traceback` name only.

    Nothing changes in any other process (the Pulumi program imports this module too) or for
    any other code in this one. It always wraps the real traceback module, so importing or
    reloading this module again replaces the shim instead of stacking shims.
    """
    server = sys.modules.get("__main__")
    spec = getattr(server, "__spec__", None)
    if getattr(spec, "name", None) == "pulumi.dynamic.__main__" and hasattr(server, "traceback"):
        server.traceback = _ServerTraceback(traceback)


_scope_one_line_errors_to_the_provider_server()
