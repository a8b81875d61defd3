"""The one stage abstraction: an Arrow table of samples in, the same rows with columns added out.

A stage never imports an engine. Engines (``mmcurate.engines``) call, per worker, ``setup()`` once
and then ``process()`` on batches of *kept* rows; they move newly rejected rows to the rejects
ledger. Global stages (dedup, top-fraction selection) add a second step, ``decide()``, that sees
the ``key`` and ``global_columns`` of every kept row of the dataset and names the keys to reject.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmcurate.options import build_config


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; engines size pools and actors from it."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 0.0


@dataclass
class NoConfig:
    """Config of a stage that takes no options."""


class Stage:
    """Base class of every stage. Subclasses set the class variables and implement ``process``."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    needs: ClassVar[tuple[str, ...]] = ()
    # Columns it writes, new ones or ones it rewrites (capfilt's ``caption``): the class's, or set from
    # the options in ``__init__`` (caption_quality rewrites ``caption`` only when it normalises).
    adds: tuple[str, ...] = ()
    batch_size: ClassVar[int | None] = None  # rows per process() call; None: the whole shard
    # Whether process() treats each row on its own and costs enough to spread (download): with fewer
    # shards than workers, the local engine cuts a shard's kept rows into one piece per worker.
    split_rows: ClassVar[bool] = False
    # What one worker needs: the class's default; a stage whose needs follow its options (a model on
    # a GPU or not) sets its own in ``__init__``.
    resources: Resources = Resources()
    # Columns besides ``key`` that a global stage's ``decide`` reads: the class's, or derived from
    # the options (``select``'s top_fraction columns).
    global_columns: tuple[str, ...] = ()

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()
        # How the run names this stage in reject_stage and stats: its name, or ``name#k`` where a
        # pipeline holds several stages of one name (set by the pipeline).
        self.label = self.name

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> Stage:
        return cls(build_config(cls.Config, params or {}, f"stage {cls.name}"))

    @property
    def is_global(self) -> bool:
        """Whether a global step follows ``process``: ``decide`` over the kept rows of the whole dataset."""
        return False

    def check(self) -> None:
        """Raise UsageError for a mistake found without loading anything (a list or model file that does not
        exist); the run calls it before it writes anything, a worker's ``setup`` being too late for that."""

    def setup(self) -> None:
        """Load models and other per-worker state. Called once per worker, before any batch."""

    def process(self, batch: pa.Table) -> pa.Table:
        """Return ``batch`` with the ``adds`` columns and ``reject_reason`` set on rejected rows."""
        raise NotImplementedError

    def decide(self, table: pa.Table) -> pa.Table:
        """For a global stage: ``(key, reject_reason, duplicate_of)`` naming the rows to reject, given
        ``key`` plus ``global_columns`` of every kept row. Removal is always by key."""
        raise NotImplementedError(f"stage {self.name} is not a global stage")

    def shard_stats(self, rejected: pa.Table) -> dict[str, Any]:
        """Entries this stage adds to its line of a shard's stats, from the shard's rows it rejected (none by default)."""
        return {}

    def events(self) -> dict[str, int]:
        """Counts of events since the last call (a model stage's out-of-memory halvings); the engines
        keep them in the shard's ledger and add them to the stage's line of its stats."""
        return {}


class GlobalStage(Stage):
    """A stage whose decision needs the whole dataset (dedup): always global.

    ``process`` adds per-row signature columns (it may reject rows, e.g. ones it cannot hash);
    ``decide`` receives ``key`` plus ``global_columns`` of every kept row and returns a table
    ``(key, reject_reason, duplicate_of)`` naming the rows to reject. Removal is always by key.
    """

    @property
    def is_global(self) -> bool:
        return True


DECISION_SCHEMA = pa.schema([("key", pa.string()), ("reject_reason", pa.string()), ("duplicate_of", pa.string())])


def decisions(keys: Any, reason: str | Any, duplicate_of: Any = None) -> pa.Table:
    """Build a decision table; ``reason`` may be one string for all rows."""
    keys = pa.array(keys, pa.string())
    if isinstance(reason, str):
        reason = pa.array([reason] * len(keys), pa.string())
    if duplicate_of is None:
        duplicate_of = pa.nulls(len(keys), pa.string())
    return pa.Table.from_arrays([keys, pa.array(reason, pa.string()), pa.array(duplicate_of, pa.string())], schema=DECISION_SCHEMA)


def set_column(table: pa.Table, name: str, values: Any, type: pa.DataType | None = None) -> pa.Table:
    """Add or replace column ``name``."""
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type)
    if type is not None and array.type != type:
        array = array.cast(type)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


def reject(table: pa.Table, mask: Any, reason: str | Any) -> pa.Table:
    """Set ``reject_reason`` to ``reason`` where ``mask`` is true and the row is not yet rejected.

    ``reason`` is one string or an array of strings (one per row). A null mask entry rejects nothing.
    """
    mask = pa.array(np.asarray(mask, dtype=bool)) if not isinstance(mask, (pa.Array, pa.ChunkedArray)) else mask
    mask = pc.fill_null(mask, False)
    current = table.column("reject_reason") if "reject_reason" in table.column_names else pa.nulls(table.num_rows, pa.string())
    if isinstance(reason, str):
        reason = pa.scalar(reason, pa.string())
    else:
        reason = pa.array(reason, pa.string()) if not isinstance(reason, (pa.Array, pa.ChunkedArray)) else reason
    new = pc.if_else(pc.and_(mask, pc.is_null(current)), reason, current)
    return set_column(table, "reject_reason", new, pa.string())
