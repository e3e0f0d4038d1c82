"""The benchmark's table: S virtual services x R real servers, in every form a phase needs.

One table, four spellings: provider inputs for ipvs-ingress, one `ipvsadm` command per rule for
the per-rule baseline, one `ipvsadm-restore` batch for the floor, and the `ipvsadm -Sn` lines the
director must show afterwards (every phase is checked against them, so a phase that is fast
because it did less fails instead of winning).
"""

from __future__ import annotations

from dataclasses import dataclass

VIP_PREFIX = "198.51.100."  # RFC 5737 TEST-NET-2; the real servers are on the lab's TEST-NET-3
PORTS = (80, 443, 8080, 8443)  # a web VIP carries several ports: S services share S/4 VIPs
MAX_SERVICES = 254 * len(PORTS)
SCHEDULER = "wlc"
OWNER = "ipvs-ingress/bench"  # the stack the benchmark applies as (ownership is per stack)
WEIGHT = 1
CHANGED_WEIGHT = 2  # the one-change phase sets this on the first real server of the first service


@dataclass(frozen=True)
class Service:
    vip: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.vip}:{self.port}"


@dataclass(frozen=True)
class Workload:
    services: tuple[Service, ...]
    real_servers: tuple[str, ...]

    @classmethod
    def build(cls, services: int, real_servers: list[str]) -> Workload:
        if not 1 <= services <= MAX_SERVICES:
            raise ValueError(f"S must be 1..{MAX_SERVICES}, not {services}")
        if not real_servers:
            raise ValueError("R must be at least 1")
        table = tuple(
            Service(f"{VIP_PREFIX}{1 + i // len(PORTS)}", PORTS[i % len(PORTS)])
            for i in range(services)
        )
        return cls(table, tuple(real_servers))

    @property
    def rule_count(self) -> int:
        return len(self.services) * (1 + len(self.real_servers))

    @property
    def vips(self) -> list[str]:
        return list(dict.fromkeys(s.vip for s in self.services))

    def weight(self, service_index: int, rs_index: int, changed: bool) -> int:
        return CHANGED_WEIGHT if changed and (service_index, rs_index) == (0, 0) else WEIGHT

    def rules(self, changed: bool = False) -> list[str]:
        """ipvsadm arguments, one rule each, in exactly the form `ipvsadm -Sn` prints them."""
        out = []
        for i, svc in enumerate(self.services):
            out.append(f"-A -t {svc.address} -s {SCHEDULER}")
            out += [
                f"-a -t {svc.address} -r {rs}:{svc.port} -g -w {self.weight(i, j, changed)}"
                for j, rs in enumerate(self.real_servers)
            ]
        return out

    def restore_batch(self) -> str:
        return "".join(f"{rule}\n" for rule in self.rules())

    def expected_dump(self, changed: bool = False) -> list[str]:
        return sorted(self.rules(changed))

    def props(self, director: dict, changed: bool = False) -> list[dict]:
        """Provider inputs, one VirtualService per service, as the program would declare them."""
        return [
            {
                "director": director,
                "vip": svc.vip,
                "port": svc.port,
                "protocol": "tcp",
                "scheduler": SCHEDULER,
                "persistenceSeconds": 0,
                "realServers": [
                    {"address": rs, "weight": self.weight(i, j, changed)}
                    for j, rs in enumerate(self.real_servers)
                ],
                "owner": OWNER,
            }
            for i, svc in enumerate(self.services)
        ]


def normalize_dump(text: str) -> list[str]:
    return sorted(" ".join(line.split()) for line in text.splitlines() if line.strip())
