"""Select rows by stored score columns: score once, select many.

```yaml
- select: {min: {clip_score: 0.28}, max: {nsfw_score: 0.5}}   # thresholds, shard by shard
- select: {top_fraction: {clip_score: 0.3}}                     # DataComp: best 30% of the dataset
```
Thresholds are inclusive (``min: 0.28`` keeps 0.28) and compare the stored value, so re-applying a
filter's threshold here rejects exactly the rows the filter would have. ``top_fraction`` ranks the
kept rows of the whole dataset (after the thresholds) by the column, best first, ties broken by
key, and keeps ``round(fraction x rows)`` of them; with it, ``select`` is a global stage
(``is_global``), a decision over the whole dataset after the thresholds shard by shard. Any
numeric column works, extra source columns (e.g. LAION's ``similarity``) included.

Reasons: ``COLUMN_missing`` (null or NaN score), ``COLUMN_below_min``, ``COLUMN_above_max``,
``COLUMN_not_top``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.errors import UsageError
from mmcurate.options import bounded
from mmcurate.stages.base import Resources, Stage, decisions, reject


@dataclass
class SelectConfig:
    min: dict[str, float] = field(default_factory=dict)  # column -> lowest value kept
    max: dict[str, float] = field(default_factory=dict)  # column -> highest value kept
    top_fraction: dict[str, float] = bounded(default_factory=dict, gt=0, le=1)  # column -> fraction of the dataset kept

    def __post_init__(self) -> None:
        if not (self.min or self.max or self.top_fraction):
            raise ValueError("give at least one of min, max or top_fraction")

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.min, *self.max, *self.top_fraction]))


class Select(Stage):
    """Select rows by stored scores: ``min``/``max`` thresholds, the best ``top_fraction`` of the dataset.

    Rows whose score is missing or outside the thresholds are rejected shard by shard; a
    ``top_fraction`` then ranks the kept rows of the whole dataset in a global step.
    """

    name = "select"
    Config = SelectConfig
    resources = Resources(cpus=1)

    def __init__(self, config: SelectConfig | None = None) -> None:
        super().__init__(config)
        self.needs = self.config.columns  # checked against the input's columns before the run writes anything

    @property
    def is_global(self) -> bool:
        """Global (a ranking over the whole dataset, after the thresholds) when given a ``top_fraction``."""
        return bool(self.config.top_fraction)

    @property
    def global_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.config.top_fraction)

    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        missing = [name for name in c.columns if name not in batch.column_names]
        if missing:
            raise UsageError(f"select: the input has no column {missing[0]!r}; run the stage that computes it first")
        values = {name: _values(batch, name) for name in c.columns}
        for name, column in values.items():
            batch = reject(batch, pc.or_kleene(pc.is_null(column), pc.is_nan(column)), f"{name}_missing")
        for name, bound in c.min.items():
            batch = reject(batch, pc.less(values[name], bound), f"{name}_below_min")
        for name, bound in c.max.items():
            batch = reject(batch, pc.greater(values[name], bound), f"{name}_above_max")
        return batch

    def decide(self, table: pa.Table) -> pa.Table:
        rejected: dict[str, str] = {}
        for name, fraction in self.config.top_fraction.items():
            order = pc.sort_indices(table, sort_keys=[(name, "descending"), ("key", "ascending")])
            keep = math.floor(fraction * table.num_rows + 0.5)
            for key in table.column("key").take(order[keep:]).to_pylist():
                rejected.setdefault(key, f"{name}_not_top")
        return decisions(list(rejected), list(rejected.values()))


def _values(batch: pa.Table, name: str) -> pa.ChunkedArray:
    column = batch.column(name)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise UsageError(f"select: column {name!r} holds {column.type}, not numbers")
    return column.cast(pa.float64())
