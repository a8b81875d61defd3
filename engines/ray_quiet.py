"""Keep Ray's noise out of a driver's output while a pipeline runs on Ray.

- Ray's C++ core worker of this process writes an error line for every Ray Data actor pool (the
  pool's arguments live in the object store and its actors may restart: ray-project/ray#57733, a
  warning about Ray Data's own arguments, nothing a pipeline can change). Those lines are dropped
  from file descriptor 2; every other byte passes through unchanged.
- The cluster's error messages (a lost node, a killed worker) reach the driver with the raylet's
  state dump attached; each is shown as its first line.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)


@contextmanager
def quiet_driver() -> Iterator[None]:
    """While the block runs: drop :data:`NOISE` lines from fd 2 and shorten the cluster's error messages."""
    import ray._private.worker as ray_worker

    shown = ray_worker.print_to_stdstream

    def first_lines(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            data = {**data, "lines": [str(line).strip().partition("\n")[0] for line in data["lines"]]}
        shown(data, ignore_prefix)

    ray_worker.print_to_stdstream = first_lines
    try:
        with _drop_lines(NOISE):
            yield
    finally:
        ray_worker.print_to_stdstream = shown


@contextmanager
def _drop_lines(patterns: tuple[bytes, ...]) -> Iterator[None]:
    """fd 2 through a pipe whose reader forwards everything but complete lines holding one of ``patterns``."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, os.dup(saved), patterns), name="mmcurate-stderr", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes this process's write end: the pump sees the end once Ray's children let go
        pump.join(timeout=2)
        os.close(saved)


def _pump(read_end: int, out: int, patterns: tuple[bytes, ...]) -> None:
    """Forward ``read_end`` to ``out``; a partial line goes out at once unless it may be a C++ log line (``[time ...``)."""
    pending = b""
    try:
        while chunk := os.read(read_end, 65536):
            complete, newline, pending = (pending + chunk).rpartition(b"\n")
            lines = complete.split(b"\n") if newline else []
            data = b"".join(line + b"\n" for line in lines if not any(p in line for p in patterns))
            if pending and not (pending.startswith(b"[") and len(pending) < 65536):
                data, pending = data + pending, b""  # a progress bar's line in the making
            _write_all(out, data)
        _write_all(out, pending)
    finally:
        os.close(read_end)
        os.close(out)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
