"""The SDK's provider server (`python -m pulumi.dynamic`) with a director on this machine: the
real agent on test_agent_logic's in-memory kernel, in place of the SSH session.

    python -u -m tests.provider.memory_director DIR

Everything the engine does goes through gRPC as usual; only `POOL.session` is replaced, so the
provider's create/read/update/delete reach agent.Agent directly, every request and reply
crossing JSON as on the wire. The kernel lives in DIR/kernel.json between requests (a test
edits it for out-of-band drift), the record in DIR/state.json, every request as it arrived in
DIR/requests.jsonl (what the provider sends, e.g. a service's `vrrp`). When DIR/health.json exists
(a test wrote it: the runtime's drains), the agent runs as inside the runtime process: with a
probing.HealthKeeper loaded from it and configured from the record as the runtime's pass does.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from providers import agent, model, ownership, probing, transport
from tests.unit.test_agent_logic import MemoryKernel


def load_kernel(path: Path) -> MemoryKernel:
    kernel = MemoryKernel()
    if path.exists():
        data = json.loads(path.read_text())
        for doc in data["services"]:
            svc = model.LiveService.from_dict(doc)
            kernel.services[(svc.protocol, svc.vip, svc.port)] = svc
        kernel.addresses = {(index, vip) for index, vip in data["addresses"]}
        kernel.forwarding, kernel.loaded = data["forwarding"], data["loaded"]
    return kernel


def save_kernel(path: Path, kernel: MemoryKernel) -> None:
    data = {
        "services": [svc.to_dict() for svc in kernel.services.values()],
        "addresses": sorted(kernel.addresses),
        "forwarding": kernel.forwarding,
        "loaded": kernel.loaded,
    }
    path.write_text(json.dumps(data))


class Session:
    def __init__(self, folder: Path):
        self.kernel_path = folder / "kernel.json"
        self.health_path = folder / "health.json"
        self.requests_path = folder / "requests.jsonl"

    def _health(self) -> probing.HealthKeeper | None:
        if not self.health_path.exists():
            return None
        keeper = probing.HealthKeeper(str(self.health_path), log=lambda _line: None)
        services = []
        for key, entry in ownership.Ownership.load().services.items():
            if isinstance(entry.get("spec"), dict) and isinstance(entry.get("health"), dict):
                spec = model.spec_from_dict(entry["spec"])
                services.append((key, spec, model.check_health(entry["health"], spec.protocol)[0]))
        keeper.configure(services)
        return keeper

    def request(self, op: str, **fields) -> dict:
        with self.requests_path.open("a") as log:
            log.write(json.dumps({"op": op, **fields}) + "\n")
        kernel = load_kernel(self.kernel_path)
        agent.HEALTH = self._health()
        try:
            reply = agent.Agent(kernel).handle(json.loads(json.dumps({"op": op, **fields})))
        finally:
            save_kernel(self.kernel_path, kernel)
        return json.loads(json.dumps(reply))


def main(folder: Path) -> None:
    ownership.STATE_PATH = str(folder / "state.json")
    ownership.LOCK_PATH = str(folder / "lock")
    session = Session(folder)
    transport.POOL.session = lambda _director, _key: session
    sys.argv = [sys.argv[0]]
    runpy.run_module("pulumi.dynamic", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
