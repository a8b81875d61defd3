"""Kill points, for the tests that resume killed runs: ``MMCURATE_KILL_AT=NAME:N`` makes the process
kill itself with SIGKILL (as ``kill -9`` would: no clean-up of any kind) the N-th time it passes
point NAME.

Points: ``read`` (a shard's rows read), ``stage`` (a stage applied to a shard's rows), ``global``
(a global stage's decision computed, not yet written), ``write`` (a file written under its
temporary name, not yet renamed). The variable is read once, by the process that starts with it,
and removed from its environment, so its workers (pool processes, Ray and Spark workers) do not
inherit it, nor does a forked worker count its copy: only that process counts and dies.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "MMCURATE_KILL_AT"
_SPEC = os.environ.pop(ENV, None)
_PID = os.getpid()
_passed: Counter[str] = Counter()


def reached(name: str) -> None:
    """Count a pass of point ``name``; SIGKILL this process on the pass ``MMCURATE_KILL_AT`` names."""
    if _SPEC is None or os.getpid() != _PID:
        return
    point, _, count = _SPEC.partition(":")
    if point == name:
        _passed[name] += 1
        if _passed[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
