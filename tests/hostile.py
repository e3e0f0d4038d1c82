"""The standing hostile suite's tally, printed as one line at the end of `./dev test`.

Tests that attack the code (fuzzing, crash points, drift cases) report what they ran here; the
summary line is `hostile: N fuzz cases, K crash points, M drift cases, 0 tracebacks, 0 stuck,
0 lost`. A test adds its counts only after its own assertions passed, so the line never claims
more than was checked; a failing test fails the run anyway.
"""

from __future__ import annotations

from collections import Counter

KINDS = ("fuzz cases", "crash points", "drift cases", "tracebacks", "stuck", "lost")
TALLY: Counter[str] = Counter()


def record(**counts: int) -> None:
    """record(fuzz_cases=1000) / record(crash_points=12, stuck=0) ..."""
    for name, n in counts.items():
        kind = name.replace("_", " ")
        if kind not in KINDS:
            raise ValueError(f"unknown hostile tally {name!r}: use one of {KINDS}")
        TALLY[kind] += n


def summary() -> str | None:
    if not any(TALLY[k] for k in KINDS[:3]):
        return None
    return "hostile: " + ", ".join(f"{TALLY[k]} {k}" for k in KINDS)
