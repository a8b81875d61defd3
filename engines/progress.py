"""What a run shows on stderr while it runs (the table at its end is :mod:`tooling.summary`'s).

Per segment a bar (rows, rows/s, kept and rejected so far), then a line per stage of the segment
(rows in, rejected, rows/s of the stage's own time); a line per global step (rows decided, rows
rejected, seconds). Where stderr is no terminal (a job's log), the bar is a line at most every
:data:`LOG_EVERY_S` seconds instead: rows and shards done, kept and rejected so far (Spark: shards done).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from tqdm import tqdm

from mmcurate.engines.core import Segment
from mmcurate.shards.summary import rate

LOG_EVERY_S = 60.0


class ShardDone(NamedTuple):
    """A shard through one segment: its rows, and per stage of the segment ``(label, rows in, rejected, seconds)``."""

    rows: int
    kept: int
    stages: tuple[tuple[str, int, int, float], ...]

    @classmethod
    def of(cls, rows: int, stats: dict, segment: Segment, first: bool) -> ShardDone:
        """From a shard's stats (:func:`engines.core.shard_stats`) after ``segment`` (``first``: the run's first, which reads)."""
        labels = {s.label for s in segment.stages if not s.is_global} | ({"read"} if first else set())
        entries = tuple((e["stage"], e["rows_in"], e["rejected"], e["seconds"]) for e in stats["stages"] if e["stage"] in labels)
        return cls(rows, stats["kept"], entries)

    def encode(self) -> str:
        """As a string, for engines that hand it back through a data frame (Ray, Spark)."""
        return json.dumps(self)

    @classmethod
    def decode(cls, text: str) -> ShardDone:
        rows, kept, stages = json.loads(text)
        return cls(rows, kept, tuple(tuple(entry) for entry in stages))


@dataclass
class SegmentProgress:
    """The live bar of one segment, and its per-stage lines when it ends."""

    label: str
    total: int
    enabled: bool
    unit: str = "rows"  # or "shards": the bar counts finished shards (Spark advances it from its task tracker)
    bar: tqdm = field(init=False)
    log: bool = field(init=False)  # stderr is no terminal (a job's log): a line now and then instead of the bar
    done: int = 0  # in ``unit``
    shards: int = 0
    kept: int = 0
    rows: int = 0
    stages: dict[str, list] = field(default_factory=dict)
    _logged: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.bar = tqdm(total=self.total, unit=self.unit, desc=self.label, disable=not self.enabled or None, file=sys.stderr)
        self.log = self.enabled and not sys.stderr.isatty()

    def update(self, done: ShardDone) -> None:
        self.shards += 1
        self.kept += done.kept
        self.rows += done.rows
        for label, rows_in, rejected, seconds in done.stages:
            entry = self.stages.setdefault(label, [0, 0, 0.0])
            entry[0] += rows_in
            entry[1] += rejected
            entry[2] += seconds
        if self.unit == "rows":  # a bar of shards is advanced by its caller
            self.advance_to(self.done + done.rows)
        self.bar.set_postfix(kept=self.kept, rejected=self.rows - self.kept, refresh=False)

    def advance_to(self, n: int) -> None:
        self.bar.update(max(n, self.done) - self.done)
        self.done = max(n, self.done)
        if self.log and time.monotonic() - self._logged >= LOG_EVERY_S:
            self._logged = time.monotonic()
            line = f"{self.label}: {self.done}/{self.total} {self.unit} done"
            if self.unit == "rows":  # Spark counts shards from its tracker and hears of their rows at the end
                line += f" ({self.shards} shards), {self.kept} kept, {self.rows - self.kept} rejected"
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            for label, (rows_in, rejected, seconds) in self.stages.items():
                print(f"  {label}: {rows_in} rows in, {rejected} rejected, {rate(rows_in, seconds)} rows/s", file=sys.stderr)


@contextmanager
def global_step(label: str, rows: int | None, enabled: bool) -> Iterator[list[int]]:
    """A line before and after a global step; the caller puts the rows it rejected in the yielded list.

    ``rows`` (the rows it decides over) is None where the caller does not know it (a resumed run).
    """
    if enabled:
        print(f"global step {label}: deciding" + ("" if rows is None else f" over {rows} rows"), file=sys.stderr)
    start, rejected = time.perf_counter(), []
    yield rejected
    if enabled:
        of = "" if rows is None else f" of {rows}"
        print(f"global step {label}: {sum(rejected)}{of} rows rejected in {time.perf_counter() - start:.1f} s", file=sys.stderr)
