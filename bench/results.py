"""What one benchmark run measured, the goals of issue 4, and how both are printed."""

from __future__ import annotations

import json
from dataclasses import dataclass


class BenchError(Exception):
    """A phase failed or left the director in the wrong state: the run's numbers are void."""


@dataclass(frozen=True)
class Phase:
    name: str
    what: str
    seconds: float
    handshakes: int
    kernel_changes: int  # kernel objects the phase changed (VIP binds count: they are kernel state)
    requests: int  # provider RPCs, or SSH sessions for the plain-ssh phases
    installs: int | None = None  # interpreters started on the director; None: plain ssh
    runtime_pids: tuple[int, ...] = ()  # the runtime process(es) that answered
    connected_seconds: float | None = None  # ipvs-ingress: phase start until SSH is up
    ready_seconds: float | None = None  # ipvs-ingress: phase start until the runtime greeted

    @property
    def per_request_ms(self) -> float:
        """ipvs-ingress: cost of one request once attached; ssh: cost of one session."""
        busy = self.seconds - (self.ready_seconds or 0.0)
        return 1000.0 * max(busy, 0.0) / self.requests


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@dataclass(frozen=True)
class Goal:
    text: str
    met: bool
    value: str


@dataclass(frozen=True)
class Result:
    services: int
    real_servers: int
    install: Phase
    create: Phase
    refresh: Phase
    refresh2: Phase
    change: Phase
    per_rule: Phase
    floor: Phase
    dump: Phase
    directors: int = 1

    @property
    def ipvs_ingress_phases(self) -> tuple[Phase, ...]:
        """The `pulumi` runs after the runtime is installed."""
        return (self.create, self.refresh, self.refresh2, self.change)

    @property
    def runtime_pids(self) -> set[int]:
        return {pid for p in (self.install, *self.ipvs_ingress_phases) for pid in p.runtime_pids}

    def summary(self) -> dict:
        """The final JSON line: exactly the keys issue 4 lists."""
        return {
            "S": self.services,
            "R": self.real_servers,
            "create_s": round(self.create.seconds, 3),
            "per_rule_s": round(self.per_rule.seconds, 3),
            "floor_s": round(self.floor.seconds, 3),
            "refresh_s": round(self.refresh.seconds, 3),
            "dump_s": round(self.dump.seconds, 3),
            "create_vs_per_rule": round(self.create.seconds / self.per_rule.seconds, 4),
            "create_vs_floor": round(self.create.seconds / self.floor.seconds, 3),
            "refresh_vs_floor": round(self.refresh.seconds / self.dump.seconds, 3),
            "install_s": round(self.install.seconds, 3),
            "refresh2_s": round(self.refresh2.seconds, 3),
            "handshakes_create": self.create.handshakes,
            "interpreters_after_install": sum(p.installs or 0 for p in self.ipvs_ingress_phases),
            "runtime_pids": len(self.runtime_pids),
            "objects_touched_one_change": self.change.kernel_changes,
        }

    def goals(self) -> list[Goal]:
        s = self.summary()
        per_phase = ", ".join(
            f"{p.name} {p.handshakes}/{p.installs}" for p in self.ipvs_ingress_phases
        )
        return [
            Goal("create_vs_per_rule <= 0.1", s["create_vs_per_rule"] <= 0.1,
                 f"{s['create_vs_per_rule']}"),
            Goal("create_vs_floor <= 2", s["create_vs_floor"] <= 2, f"{s['create_vs_floor']}"),
            Goal("refresh_vs_floor <= 1.5", s["refresh_vs_floor"] <= 1.5,
                 f"{s['refresh_vs_floor']}"),
            Goal(
                f"one handshake per director ({self.directors}) and no interpreter started on "
                "the director per pulumi run after the install",
                all(p.handshakes == self.directors and p.installs == 0
                    for p in self.ipvs_ingress_phases),
                f"handshakes/interpreters: {per_phase}",
            ),
            Goal("every run answered by the one runtime process the install started",
                 s["runtime_pids"] == self.directors,
                 f"runtime pids: {sorted(self.runtime_pids)}"),
            Goal("a single weight change touches 1 kernel object",
                 s["objects_touched_one_change"] == 1, f"{s['objects_touched_one_change']}"),
        ]  # fmt: skip

    def render(self) -> str:
        rows = [
            ("phase", "operations", "seconds", "handshakes", "interpreters", "kernel changes",
             "connected s", "attached s", "per op ms"),
        ]  # fmt: skip
        for p in (self.install, self.create, self.refresh, self.refresh2, self.change,
                  self.per_rule, self.floor, self.dump):  # fmt: skip
            rows.append((
                p.name, p.what, f"{p.seconds:.2f}", str(p.handshakes),
                "-" if p.installs is None else str(p.installs), str(p.kernel_changes),
                _seconds(p.connected_seconds), _seconds(p.ready_seconds),
                f"{p.per_request_ms:.0f}",
            ))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"S={self.services} virtual services x R={self.real_servers} real servers, "
                 f"{self.directors} director"]  # fmt: skip
        for n, row in enumerate(rows):
            cells = [
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        s = self.summary()
        lines.append("")
        lines.append(
            f"ratios (smaller is better for ipvs-ingress): create/per-rule {s['create_vs_per_rule']}"
            f"  create/floor {s['create_vs_floor']}  refresh/dump {s['refresh_vs_floor']}"
        )
        lines.append("goals:")
        for g in self.goals():
            lines.append(f"  [{'MET' if g.met else 'MISSED'}] {g.text}: {g.value}")
        return "\n".join(lines)

    def json_line(self) -> str:
        return json.dumps(self.summary(), separators=(", ", ": "))
