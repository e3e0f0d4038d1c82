"""Real-server health state on the director: rise/fall per target, drain weights, persistence.

Pure (stdlib and providers.model only): no I/O and no clock of its own. The caller (the
director runtime) probes, passes each result with its own time (wall-clock seconds, so `since`
survives a reboot) and writes to_json() to /var/lib/ipvs-ingress/health.json.

- A target is one real server of one virtual service: (service key "tcp/203.0.113.201:80",
  real server "203.0.113.11:80"). A new target starts up, so a fresh service is not drained
  before a probe failed; `fall` consecutive failures take it down, `rise` consecutive successes
  bring it back.
- A target persisted as down stays down after from_json until `rise` new successes: a restart
  or a reboot never puts a failing server back into service before a probe has succeeded.
- effective_weights: a down target gets weight 0 (drained: no new connections, established ones
  finish), except that at least ceil(depoolThreshold * n) of the service's n real servers stay
  pooled with their configured weight (PyBal's depool-threshold); a configured weight 0 is
  never pooled. When more are down, those down longest are drained first and the rest are
  held in service, each with a line saying why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from providers import model

FORMAT = 1  # health.json's "version"
MAX_REASON = 200  # a probe's reason is kept for status and log: one bounded line
MAX_COUNT = 1_000_000  # consecutive counts stop growing here (rise and fall are at most 10)
_MAX_KEY = 300  # a service key or "addr:port" is far shorter; longer is not ours


@dataclass
class Target:
    """One real server of one service: up or down, the consecutive successes and failures that
    lead to the next change, when the current state began (`since`: the caller's time, None for
    a target that was never observed to change) and the last failure's reason."""

    up: bool = True
    successes: int = 0
    failures: int = 0
    since: float | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return {
            "up": self.up,
            "successes": self.successes,
            "failures": self.failures,
            "since": self.since,
            "reason": self.reason,
        }


def rs_key(address: str, port: int) -> str:
    """A real server as a target name: "203.0.113.11:80", "[2001:db8::11]:80"."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _rise_fall(health: Mapping | None) -> tuple[int, int]:
    health = health or {}
    d = model.HEALTH_DEFAULTS
    return int(health.get("rise", d["rise"])), int(health.get("fall", d["fall"]))


class Tracker:
    """Targets by service key, then by real server; rise and fall per service (configure)."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Target]] = {}
        self._counts: dict[str, tuple[int, int]] = {}

    def configure(self, key: str, health: Mapping | None) -> None:
        """The service's health settings (model.check_health's form): its rise and fall.
        Unconfigured services use the defaults (2 and 2)."""
        self._counts[key] = _rise_fall(health)

    def target(self, key: str, rs: str) -> Target:
        """The target's state; one never seen is up."""
        return self.services.setdefault(key, {}).setdefault(rs, Target())

    def states(self, key: str) -> dict[str, Target]:
        """The service's targets by real server (those never observed are absent: up)."""
        return self.services.get(key, {})

    def observe(self, key: str, rs: str, ok: bool, reason: str, now: float) -> bool:
        """One probe result; True when it changed the target between up and down."""
        rise, fall = self._counts.get(key) or _rise_fall(None)
        t = self.target(key, rs)
        if ok:
            t.successes, t.failures = min(t.successes + 1, MAX_COUNT), 0
            if not t.up and t.successes >= rise:
                t.up, t.since = True, now
                return True
            return False
        t.failures, t.successes = min(t.failures + 1, MAX_COUNT), 0
        t.reason = _one_line(reason)
        if t.up and t.failures >= fall:
            t.up, t.since = False, now
            return True
        return False

    def forget(self, key: str, keep: Iterable[str] | None = None) -> None:
        """Drop a service's targets (all, or those not in `keep`: removed real servers)."""
        if keep is None:
            self.services.pop(key, None)
            self._counts.pop(key, None)
            return
        kept = set(keep)
        targets = self.services.get(key, {})
        for rs in [rs for rs in targets if rs not in kept]:
            del targets[rs]

    def to_json(self) -> str:
        services = {
            key: {rs: t.to_dict() for rs, t in sorted(targets.items())}
            for key, targets in sorted(self.services.items())
            if targets
        }
        return json.dumps({"version": FORMAT, "services": services}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: object) -> tuple[Tracker, str | None]:
        """The tracker text describes, and None; or, for text that cannot be read, an empty
        tracker (every target up) and one line saying why. Targets persisted as down stay
        down, with no successes counted: they need `rise` new ones. A malformed target is
        dropped (it starts up) and counted in the reason."""
        tracker = cls()
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as err:
            why = " ".join(str(err).split())[:80]
            return tracker, f"not JSON ({why}): every real server starts up"
        if not isinstance(data, dict) or data.get("version") != FORMAT:
            return tracker, f"not a version {FORMAT} health record: every real server starts up"
        services = data.get("services")
        if not isinstance(services, dict):
            return tracker, "no services object: every real server starts up"
        dropped = 0
        for key, targets in services.items():
            if not (_name(key) and isinstance(targets, dict)):
                dropped += 1
                continue
            for rs, raw in targets.items():
                target = _target(raw) if _name(rs) else None
                if target is None:
                    dropped += 1
                    continue
                tracker.services.setdefault(key, {})[rs] = target
        if dropped:
            return tracker, f"{dropped} malformed entr{'y' if dropped == 1 else 'ies'} dropped (those real servers start up)"  # fmt: skip
        return tracker, None


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_KEY and value.isprintable()


def _count(value: object) -> int | None:
    return value if type(value) is int and 0 <= value <= MAX_COUNT else None


def _target(raw: object) -> Target | None:
    """A persisted target, or None when any field is not what to_json writes."""
    if not isinstance(raw, dict) or not isinstance(raw.get("up"), bool):
        return None
    failures, since, reason = _count(raw.get("failures", 0)), raw.get("since"), raw.get("reason", "")  # fmt: skip
    if _count(raw.get("successes", 0)) is None or failures is None or not isinstance(reason, str):
        return None
    if since is not None and not (
        type(since) in (int, float) and math.isfinite(since) and since >= 0
    ):
        return None
    # Successes are not carried over: after a restart, a drained server needs `rise` new ones.
    return Target(raw["up"], 0, failures, None if since is None else float(since), _one_line(reason))  # fmt: skip


def _one_line(reason: object) -> str:
    text = " ".join(str(reason).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def pooled_minimum(threshold: float, n: int) -> int:
    """ceil(threshold * n): the real servers that stay pooled however many fail. Rounded to
    9 places first, so 0.7 * 10 (7.000000000000001 in binary) is 7, not 8."""
    return math.ceil(round(threshold * n, 9))


def effective_weights(
    spec: model.VirtualServiceSpec,
    health: Mapping | None,
    states: Mapping[str, Target],
) -> tuple[dict[str, int], list[str]]:
    """(weight per real server "addr:port", why each held one is kept in service).

    No health check (None or check "none"): the configured weights. Otherwise down targets get
    0, unless that leaves fewer than ceil(depoolThreshold * n) of the n real servers pooled
    with their configured weight (> 0); then the longest down (earliest `since`, then by name)
    are drained up to that limit and the others keep their weight, each named in `held`.
    """
    configured = {rs_key(r.address, spec.port): r.weight for r in spec.real_servers}
    if health is None or health.get("check", "none") == "none":
        return dict(configured), []
    threshold = float(health.get("depoolThreshold", model.HEALTH_DEFAULTS["depoolThreshold"]))
    n = len(configured)
    pooled = [rs for rs, w in configured.items() if w > 0]
    down = [rs for rs in pooled if rs in states and not states[rs].up]
    keep = pooled_minimum(threshold, n)
    room = max(0, len(pooled) - keep)
    down.sort(key=lambda rs: (_since(states[rs]), rs))
    drained, held_rs = down[:room], down[room:]
    weights = {rs: 0 if rs in drained else w for rs, w in configured.items()}
    held = [
        f"{spec.key} {rs} kept in service though failing ({states[rs].reason or 'probe failed'}): "
        f"draining it would leave fewer than {keep} of {n} real servers pooled "
        f"(depoolThreshold {threshold:g})"
        for rs in held_rs
    ]
    return weights, held


def _since(t: Target) -> float:
    return t.since if t.since is not None else -1.0  # down with no time: from before, first
