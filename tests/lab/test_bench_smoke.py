"""CI's run of the director benchmark (bench/): tiny S and R on the session's lab director.

The full run (S up to 100, R=10) is by hand; this proves the benchmark still runs end to end,
prints its table and a sane JSON line, and that the structural goals hold at any size.
"""

from __future__ import annotations

import json

import pytest

from bench.__main__ import main

pytestmark = pytest.mark.lab

KEYS = {
    "S", "R", "create_s", "per_rule_s", "floor_s", "refresh_s", "dump_s", "create_vs_per_rule",
    "create_vs_floor", "refresh_vs_floor", "install_s", "refresh2_s", "handshakes_create",
    "interpreters_after_install", "runtime_pids", "objects_touched_one_change",
}  # fmt: skip


def test_bench_smoke(lab, capsys):
    code = main(["--smoke"], lab=lab)
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == KEYS
    assert (result["S"], result["R"]) == (2, 2)
    for key in (
        "create_s",
        "per_rule_s",
        "floor_s",
        "refresh_s",
        "dump_s",
        "create_vs_per_rule",
        "create_vs_floor",
        "refresh_vs_floor",
        "install_s",
        "refresh2_s",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key  # fmt: skip
    assert result["handshakes_create"] == 1
    # Two (and more) `pulumi` runs in a row after the install start no interpreter there.
    assert result["interpreters_after_install"] == 0 and result["runtime_pids"] == 1
    assert result["objects_touched_one_change"] == 1
    assert "[MET] one handshake per director (1) and no interpreter started" in out
    assert "[MET] every run answered by the one runtime process the install started" in out
    assert "[MET] a single weight change touches 1 kernel object" in out
    # The benchmark leaves the shared director as it found it: no services.
    assert lab.ipvsadm_sn().strip() == ""
