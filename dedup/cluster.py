"""The dedup stages' base class and their global step, written once for every engine.

A :class:`ClusterStage` names candidate groups (``group_rows``: exact hash, LSH band buckets, pHash
chunks) and confirms candidate pairs (``verify``); in every connected component of confirmed pairs
the smallest key is kept. Its global step is four phases over the kept rows of every shard (the
model: NeMo Curator's fuzzy dedup, minhash -> LSH buckets -> edges -> connected components):

1. ``bands``, per few shards: ``group_rows`` of each shard's rows, as ``(group, id[, copy])``, split
   by a hash of the group;
2. ``pairs``, per group partition: pair the members of each group with two or more
   (:func:`graph.member_pairs`; a group larger than ``max_group_size`` pairs its smallest key with
   the others); members with one ``copy`` id enter as one, the others paired with it alone
   (:func:`graph.first_copies`); split by the left row's shard;
3. ``left``, per partition: drop repeated pairs, attach the left rows' key and global columns (read
   from their shards: a column projection, not a shuffle of the dataset; each distinct left row once
   per piece, not once per pair); split by the right row's shard;
4. ``verify``, per partition: take the right rows' columns and call ``verify``: the edges.

The driver then keeps the smallest key of every component of the edges (:meth:`ClusterStep.decide`).
Rows travel as int64 ids, ``shard << 32 | row`` (the row's place among its shard's kept rows).

An engine supplies only the distributed primitives of :class:`Exchange`: run a phase per input or
per partition, route piece ``p`` of every task's output to partition ``p``, collect the results.
:class:`InMemory` is the in-process one; ``ClusterStage.decide`` runs the phases with it on one table.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa

from mmcurate.dedup.graph import (
    components,
    first_copies,
    member_pairs,
    shared_groups,
    sorted_distinct,
    unique_inverse,
    verify_aligned,
)
from mmcurate.dedup.hashing import mix64
from mmcurate.stages.base import GlobalStage, decisions

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
EDGES = pa.schema([("a", pa.string()), ("b", pa.string())])


class ClusterStage(GlobalStage):
    """A global stage that removes near-duplicates: candidate groups, verified pairs, components.

    Subclasses implement ``group_rows`` and, where candidates need checking, ``verify``. Every row of
    a component but the one with the smallest key is rejected with ``reason`` and ``duplicate_of`` =
    that key.
    """

    reason: ClassVar[str] = "duplicate"
    max_group_size: ClassVar[int] = 1000  # candidate groups larger than this pair only with their smallest key

    def group_rows(self, table: pa.Table) -> tuple[np.ndarray, ...]:
        """``(row, group)``, int64: rows of ``table`` (``key`` + ``global_columns``) sharing a group
        are candidate duplicates; a row may be in several groups, or in none.

        Optionally a third array, ``copy`` (int64, aligned): entries of one ``copy`` id are rows with
        equal global columns (so in the same groups, and equal under ``verify``). The step then pairs
        each group's copies of one row only with the first of them: n copies make n - 1 pairs, not n**2 / 2."""
        raise NotImplementedError

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        """For aligned rows of ``left`` and ``right`` (``global_columns``), whether each pair is a duplicate."""
        return pa.array(np.ones(left.num_rows, dtype=bool))

    def decide(self, table: pa.Table) -> pa.Table:
        """The global step on one in-memory table (``key`` + ``global_columns``): one shard, one partition."""
        table = table.select(["key", *self.global_columns]).combine_chunks()  # one copy, not one per phase that takes rows
        step = ClusterStep(self, functools.partial(_whole_table, table), table.schema, parts=1)
        return run_step(step, [0], InMemory(), maps=1)


# The kept rows of one shard: ``rows(shard_id)`` gives ``key`` + ``global_columns``,
# ``rows(shard_id, keys_only=True)`` only ``key``; both in the same row order.
Rows = Callable[..., pa.Table]


def _whole_table(table: pa.Table, shard_id: int, keys_only: bool = False) -> pa.Table:
    return table.select(["key"]) if keys_only else table


class Exchange(Protocol):
    """What an engine supplies to run a global step. Each phase task returns ``step.parts`` pieces;
    piece ``p`` of every task goes to partition ``p`` of the next phase (partitioning by key)."""

    def scatter(self, step: ClusterStep, phase: str, inputs: list[tuple]) -> Any:
        """Run ``phase(*args)`` for each args of ``inputs``; keep the pieces partitioned."""

    def exchange(self, step: ClusterStep, phase: str, pieces: Any) -> Any:
        """Run ``phase`` on each partition's pieces; keep its pieces partitioned."""

    def gather(self, step: ClusterStep, phase: str, pieces: Any) -> list:
        """Run ``phase`` on each partition's pieces; return the results to the driver."""


class InMemory:
    """The :class:`Exchange` whose pieces stay lists in this process: a phase's tasks run one after
    another (:meth:`run`), or where a subclass sends them (a process pool), their results coming back here."""

    def scatter(self, step: ClusterStep, phase: str, inputs: list[tuple]) -> list[list]:
        return _transpose(self.run(step, phase, inputs, pieces=True), step.parts)

    def exchange(self, step: ClusterStep, phase: str, pieces: list[list]) -> list[list]:
        return _transpose(self.run(step, phase, pieces, pieces=True), step.parts)

    def gather(self, step: ClusterStep, phase: str, pieces: list[list]) -> list:
        return self.run(step, phase, pieces, pieces=False)

    def run(self, step: ClusterStep, phase: str, tasks: list[tuple] | list[list], pieces: bool) -> list:
        """``phase(*args)`` for each args of ``tasks`` (``pieces``: the results are lists of pieces, not the step's results)."""
        return [getattr(step, phase)(*args) for args in tasks]


def _transpose(outputs: list[list], parts: int) -> list[list]:
    return [[output[p] for output in outputs] for p in range(parts)]


def run_step(step: ClusterStep, shard_ids: list[int], engine: Exchange, maps: int) -> pa.Table:
    """The decision table of ``step.stage`` over the kept rows of ``shard_ids``; ``bands`` runs in
    ``maps`` tasks, the other phases in ``step.parts``."""
    if not shard_ids:
        return decisions([], step.stage.reason)
    chunks = np.array_split(np.array(shard_ids), max(1, min(len(shard_ids), maps)))
    bands = engine.scatter(step, "bands", [([int(i) for i in chunk],) for chunk in chunks])
    pairs = engine.exchange(step, "pairs", bands)
    left = engine.exchange(step, "left", pairs)
    return step.decide(engine.gather(step, "verify", left))


@dataclass
class ClusterStep:
    """The phases of ``stage``'s global step over shards' kept ``rows`` (of Arrow schema ``columns``:
    ``key`` + ``global_columns``), in ``parts`` partitions. Picklable when ``rows`` is."""

    stage: ClusterStage
    rows: Rows
    columns: pa.Schema
    parts: int

    def bands(self, shard_ids: list[int]) -> list[tuple[np.ndarray, ...]]:
        """``(group, id[, copy])`` of some shards' kept rows, split by group: each shard's split while
        its arrays are small, then joined piece by piece."""
        split = [self._shard_bands(shard_id) for shard_id in shard_ids]
        return [tuple(np.concatenate(column) for column in zip(*(pieces[p] for pieces in split), strict=True)) for p in range(self.parts)]

    def _shard_bands(self, shard_id: int) -> list[tuple[np.ndarray, ...]]:
        row, group, *copies = (np.asarray(a, np.int64) for a in self.stage.group_rows(self.rows(shard_id)))
        part = mix64(group) % np.uint64(self.parts) if self.parts > 1 else None  # one part: no hash to compute
        return _split((group, (shard_id << ROW_BITS) | row, *copies), part, self.parts)

    def pairs(self, *pieces: tuple[np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Candidate pairs ``(a id, b id)`` of one partition's groups, split by the left row's shard."""
        group, ids, *copies = _concat(pieces, len(pieces[0]) if pieces else 2)
        rows, run = shared_groups(group)
        distinct, codes = unique_inverse(ids[rows])
        first, other = np.empty(0, np.int64), np.empty(0, np.int64)
        if copies:
            run, codes, first, other = first_copies(run, codes, copies[0][rows])
        center = functools.partial(_smallest_key, functools.cache(functools.partial(self.rows, keys_only=True)), distinct)
        left, right = member_pairs(run, codes, self.stage.max_group_size, center)
        a, b = distinct[np.r_[left, first]], distinct[np.r_[right, other]]
        return _split((a, b), (a >> ROW_BITS) % self.parts, self.parts)

    def left(self, *pieces: tuple[np.ndarray, np.ndarray]) -> list[tuple[pa.Table, np.ndarray, np.ndarray]]:
        """Distinct pairs split by the right row's shard, each piece sorted by the right row, as
        ``(rows, left, right)``: ``rows`` the piece's distinct left rows (``key`` + global columns),
        ``left`` each pair's place in ``rows``, ``right`` its right row's id. A left row travels once
        per piece, not once per pair (rows in large clusters are in many pairs)."""
        a, b = _distinct(*_concat(pieces, 2))
        runs = _shard_runs(a)
        if not runs:
            return [(self.columns.empty_table(), np.empty(0, np.int64), np.empty(0, np.int64))] * self.parts
        tables = [self.rows(shard_id) for shard_id, _ in runs]
        offsets = np.cumsum([0] + [t.num_rows for t in tables])
        position = np.concatenate([offsets[i] + (a[run] & ROW_MASK) for i, (_, run) in enumerate(runs)])
        order, slices = _grouping((b >> ROW_BITS) % self.parts, self.parts, within=b)
        split = []
        for piece in slices:  # a take per piece: a slice of one table would pickle the whole table's buffers
            distinct, left = unique_inverse(position[order[piece]])
            bounds = np.searchsorted(distinct, offsets)  # each table's share of the distinct rows (no copy of all rows)
            taken = [t.take(pa.array(distinct[bounds[i] : bounds[i + 1]] - offsets[i])) for i, t in enumerate(tables)]
            split.append((pa.concat_tables([self.columns.empty_table(), *taken]).combine_chunks(), left, b[order[piece]]))
        return split

    def verify(self, *pieces: tuple[pa.Table, np.ndarray, np.ndarray]) -> pa.Table:
        """The partition's pairs that ``stage.verify`` confirms, as ``(a key, b key)``. Each piece is
        sorted by the right row: the pairs of one right shard are a slice of it."""
        shard_rows = functools.cache(lambda shard_id: self.rows(shard_id).combine_chunks())
        columns = list(self.stage.global_columns)
        edges = [EDGES.empty_table()]
        for rows, left, right in pieces:
            for shard_id, run in _shard_runs(right):
                side = rows.take(pa.array(left[run]))
                other = shard_rows(shard_id).take(pa.array(right[run] & ROW_MASK))
                ok = verify_aligned(self.stage, side.select(columns), other.select(columns))
                edges.append(pa.Table.from_arrays([side.column("key"), other.column("key")], schema=EDGES).filter(pa.array(ok)))
        return pa.concat_tables(edges)

    def decide(self, edges: Sequence[pa.Table]) -> pa.Table:
        """Every key of a component of the ``edges`` but the smallest, with the smallest."""
        table = pa.concat_tables([EDGES.empty_table(), *edges])
        dups, keepers = components(table.column("a").combine_chunks(), table.column("b").combine_chunks())
        return decisions(dups, self.stage.reason, keepers)


def _smallest_key(shard_keys: Callable[[int], pa.Table], distinct: np.ndarray, members: np.ndarray) -> int:
    """The member code (index into ``distinct`` ids) of the smallest key."""
    keys = [shard_keys(int(i >> ROW_BITS)).column("key")[int(i & ROW_MASK)].as_py() for i in distinct[members]]
    return int(members[min(range(len(keys)), key=keys.__getitem__)])


def _grouping(part: np.ndarray, parts: int, within: np.ndarray | None = None) -> tuple[np.ndarray, list[slice]]:
    """The order that groups rows by ``part`` (ints below ``parts``; then by ``within``), and each of
    the ``parts`` pieces as a slice of that order."""
    key = part.astype(np.min_scalar_type(max(parts - 1, 0)))
    order = np.argsort(key, kind="stable") if within is None else np.lexsort((within, key))  # a radix sort of 8 or 16 bits
    bounds = np.r_[0, np.cumsum(np.bincount(key, minlength=parts))]
    return order, [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def _split(columns: Sequence[np.ndarray], part: np.ndarray | None, parts: int) -> list[tuple[np.ndarray, ...]]:
    """Rows of the aligned ``columns`` grouped by ``part`` into ``parts`` pieces (``part`` unused for one piece)."""
    if parts == 1:
        return [tuple(columns)]
    order, pieces = _grouping(part, parts)
    ordered = [c[order] for c in columns]
    return [tuple(c[piece] for c in ordered) for piece in pieces]


def _concat(pieces: Sequence[tuple[np.ndarray, ...]], width: int) -> list[np.ndarray]:
    return [np.concatenate([c[i] for c in pieces]) if pieces else np.empty(0, np.int64) for i in range(width)]


def _distinct(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs ``(a[i], b[i])`` of ids, sorted by ``a``."""
    distinct_a, code_a = unique_inverse(a)
    distinct_b, code_b = unique_inverse(b)
    code_a, code_b = sorted_distinct(code_a, code_b)
    return distinct_a[code_a], distinct_b[code_b]


def _shard_runs(ids: np.ndarray) -> list[tuple[int, slice]]:
    """``(shard, slice)`` of each run of one shard's ids in ``ids``, sorted ids."""
    if not len(ids):
        return []
    shards = ids >> ROW_BITS
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
    return [(int(shards[lo]), slice(lo, hi)) for lo, hi in zip(starts, np.r_[starts[1:], len(ids)], strict=True)]
