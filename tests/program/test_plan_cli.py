"""`python -m providers.plan` on hostile stack files: exit 1 and one line on stderr, before any
SSH (issue 7 item 10). Run as a subprocess, as an operator runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.program.conftest import HOST_KEY, ROOT

STACK = {
    "config": {
        "ipvs-ingress:vips": [{"address": "203.0.113.201", "ports": [{"port": 80}]}],
        "ipvs-ingress:realServers": [{"address": "203.0.113.11", "weight": 1}],
        "ipvs-ingress:director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
    }
}


def run_plan(tmp_path, text: str) -> subprocess.CompletedProcess:
    stack, key = tmp_path / "Pulumi.test.yaml", tmp_path / "key"
    stack.write_text(text)
    key.write_text("not used: the stack file is refused first\n")
    return subprocess.run(
        [sys.executable, "-m", "providers.plan", str(stack), "--key", str(key)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stack_text(port: str = "80", weight: str = "1") -> str:
    text = yaml.safe_dump(STACK, sort_keys=False)
    return text.replace("port: 80", f"port: {port}").replace("weight: 1", f"weight: {weight}")


def assert_one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[:2000]
    assert lines[0].startswith("error: ") and len(lines[0]) <= 320
    assert "Traceback" not in result.stderr
    return lines[0]


def test_huge_float_and_400_digit_int_are_one_line(tmp_path):
    line = assert_one_line(run_plan(tmp_path, stack_text("1.0e+400", "9" * 400)))
    assert line.startswith("error: ipvs-ingress:vips[0].ports[0].port: inf is not a valid port")
    assert "ipvs-ingress:realServers[0].weight: 999999" in line


@pytest.mark.parametrize(
    ("port", "weight", "words"),
    [
        ("1e400", "1", "'1e400' is not a valid port"),  # YAML 1.1 reads it as a string
        (".nan", "1", "nan is not a valid port"),
        ("80", "-" + "9" * 400, "realServers[0].weight: -999"),
        ("80", "9" * 5000, "not a readable stack file"),  # beyond int()'s digit limit
        ("x" * 1_000_000, "1", "ipvs-ingress:vips[0].ports[0].port: 'xxxx"),
    ],
    ids=["1e400-string", "nan", "negative-400-digits", "5000-digits", "1MB"],
)
def test_hostile_numbers_and_sizes_are_one_line(tmp_path, port, weight, words):
    assert words in assert_one_line(run_plan(tmp_path, stack_text(port, weight)))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("config: {a: [1, 2\n", "not YAML"),
        ("- just\n- a list\n", "not a stack file"),
        ("config: [1, 2]\n", "is not a mapping"),
        ("config:\n  ipvs-ingress:director: {host: 'fe80::1%eth0;id'}\n", "zone id"),
    ],
)
def test_malformed_stack_files_are_one_line(tmp_path, text, words):
    assert words in assert_one_line(run_plan(tmp_path, text))
