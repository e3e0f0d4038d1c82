"""Dry run against the live director: the kernel changes `pulumi up` would make, changing nothing.

`pulumi preview` never connects to the director, so it cannot see drift. This asks the
director's runtime for its plan (the same code path as an apply, stopped before the first
change). It installs nothing either: a director without the runtime of this version is one line.

    venv/bin/python -m providers.plan stacks/Pulumi.dev.yaml --key ~/.ssh/ipvs-director-dev
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from components.config import ConfigError, load_stack_file
from components.ingress import director_label, vrrp_part
from providers import model
from providers.transport import DirectorError, RuntimeSession


class StackFileError(ValueError):
    pass


def read_stack(path: Path) -> object:
    """The `config:` block of a stack file; StackFileError (one line) if it is not YAML."""
    try:
        stack = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise StackFileError(f"{path}: not YAML ({err.problem}{where}): fix the file") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        # PyYAML raises ValueError for an integer beyond int()'s digit limit.
        raise StackFileError(f"{path}: not a readable stack file ({_one_line(err)})") from None
    if stack is None:
        return {}
    if not isinstance(stack, dict):
        raise StackFileError(f"{path}: not a stack file: give a mapping with a config: block")
    return stack.get("config") or {}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def plan_stack(
    stack_config: object, private_key: str, owner: str = ""
) -> list[tuple[str, list[str]]]:
    """(virtual service key, changes) for every virtual service of the stack `owner`; with
    several directors (ipvs-ingress:directors) every director's, the key prefixed by it."""
    cfg = load_stack_file(stack_config)
    out: list[tuple[str, list[str]]] = []
    for d in cfg.directors:
        session = RuntimeSession(d.director, private_key, install=False)
        try:
            plans = _plans(session, cfg, d, owner)
        finally:
            session.close()
        where = f"{director_label(d.director)}: " if cfg.vrrp else ""
        out += [(f"{where}{key}", changes) for key, changes in plans]
    return out


def _plans(session: RuntimeSession, cfg, d, owner: str) -> list[tuple[str, list[str]]]:
    vrrp = {"vrrp": vrrp_part(cfg, d)} if cfg.vrrp else {}
    return [
        (
            spec.key,
            session.request(
                "plan",
                spec=model.spec_to_dict(dataclasses.replace(spec, owner=owner)),
                interface=d.director.interface,
                repair=cfg.repair,  # a change of ipvs-ingress:repair alone is shown too
                health=dict(cfg.health[spec.key]),  # and of the health check
                **vrrp,  # and of the director's part in the VRRP group
            )["changes"],
        )
        for spec in cfg.virtual_services
    ]


def stack_owner(stack_file: Path) -> str:
    """'<project>/<stack>' as the program names the owner, e.g. ipvs-ingress/dev."""
    project = yaml.safe_load((Path(__file__).parents[1] / "Pulumi.yaml").read_text())["name"]
    return f"{project}/{stack_file.name.removeprefix('Pulumi.').removesuffix('.yaml')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m providers.plan", description=__doc__.splitlines()[0]
    )
    parser.add_argument("stack_file", type=Path, help="stacks/Pulumi.<stack>.yaml")
    parser.add_argument(
        "--key", type=Path, required=True, help="the SSH private key file (sshPrivateKey)"
    )
    args = parser.parse_args(argv)
    try:
        owner = stack_owner(args.stack_file)
        plans = plan_stack(read_stack(args.stack_file), args.key.read_text(), owner)
    except (ConfigError, DirectorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (OSError, StackFileError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    for key, changes in plans:
        print(f"{key}: {'in sync' if not changes else f'{len(changes)} change(s)'}")
        for change in changes:
            print(f"  {change}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
