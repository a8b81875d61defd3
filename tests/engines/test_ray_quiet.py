"""The driver's stderr filter of :mod:`engines.ray_quiet`, on a real file descriptor 2."""

from __future__ import annotations

import subprocess
import sys

CODE = r"""
import os
from mmcurate.engines.ray_quiet import _drop_lines
os.write(2, b"before\n")
with _drop_lines((b"max_restarts > 0",)):
    os.write(2, b"[2026 E 1 1] core_worker.cc:1: Actor x has constructor arguments in the object store and max_restarts > 0. See\n")
    os.write(2, b"kept line\n[2026 W 1 1] other")
    os.write(2, b" warning\n\rbar 1/2")
    os.write(2, b"\rbar 2/2\n")
    os.write(2, b"[2026 E 1 1] max_restarts > 0 again\nno newline at the end")
os.write(2, b"\nafter\n")
"""


def test_only_the_noise_lines_are_dropped():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, timeout=60, check=True)
    assert done.stderr == b"before\nkept line\n[2026 W 1 1] other warning\n\rbar 1/2\rbar 2/2\nno newline at the end\nafter\n"
