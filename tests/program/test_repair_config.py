"""ipvs-ingress:repair (issue 8): whether the director runtime repairs this stack's services
between `pulumi up`s. A boolean, default true, given to every VirtualService as its `repair`
input; anything else is one line naming the key, the value and the fix, before any resource."""

from __future__ import annotations

import pulumi
import pytest

from components.config import ConfigError, load, load_stack_file
from tests.program.conftest import DEV_CONFIG, VS_TYPE, Run, dev_virtual_services, run_program

FIX = (
    "use true to have the director's runtime repair out-of-band changes to this stack's"
    " services within seconds, false to leave them for pulumi refresh and up"
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), (True, True), ("true", True), (False, False), ("false", False)],
)
def test_repair_key_values(value, expected):
    values = dict(DEV_CONFIG)
    if value is not None:
        values["repair"] = value
    assert load(values).repair is expected
    stack = {f"ipvs-ingress:{k}": v for k, v in values.items()}
    assert load_stack_file(stack).repair is expected


@pytest.mark.parametrize("bad", ["yes", "False", "", 0, 1, [], {"on": True}, "x" * 500])
def test_a_repair_that_is_not_a_boolean_is_one_line(bad):
    with pytest.raises(ConfigError) as err:
        load({**DEV_CONFIG, "repair": bad})
    shown = repr(bad) if len(repr(bad)) <= 40 else repr(bad)[:37] + "..."
    assert str(err.value) == f"ipvs-ingress:repair: {shown} is not a boolean: {FIX}"


def test_a_bad_repair_stops_the_program_before_any_resource():
    run = Run()
    with pytest.raises(pulumi.RunError) as err:
        run_program(DEV_CONFIG, raw={"repair": "off"}, run=run)
    assert str(err.value) == f"ipvs-ingress:repair: 'off' is not a boolean: {FIX}"
    assert run.resources == []


@pytest.mark.parametrize("raw", [None, "true", "false"])
def test_every_virtual_service_gets_the_stacks_repair(raw):
    run = run_program(DEV_CONFIG, raw={"repair": raw} if raw else None)
    expected = dev_virtual_services()
    found = run.of_type(VS_TYPE)
    assert sorted(r.name for r in found) == sorted(expected)
    for reg in found:
        want = {**expected[reg.name], "repair": raw != "false"}
        assert {k: reg.inputs[k] for k in want} == want
