"""Global stages on Ray, computed by Ray tasks over a segment's intermediate files.

A :class:`ClusterStage` (exact, pHash, MinHash dedup) runs the three steps of its in-memory
reference, ``ClusterStage.decide``, as a shuffle through Ray's object store: each task returns one
object per partition (``num_returns``) and each task of the next step takes one object of every
task before it. Rows travel as int64 ids, ``shard << 32 | row`` (the row's place among its shard's
kept rows), not as key strings:

1. bands, one task per few shards: read the kept rows' ``key`` + ``global_columns`` from each
   shard's intermediate file, call ``group_keys``; split ``(group, id)`` by a hash of the group;
2. pairs, one task per partition: pair the members of each group with two or more
   (:func:`stages.base.member_pairs`; a group larger than ``max_group_size`` pairs its smallest
   key, looked up for such groups only, with the others); split by the left row's shard;
3. left, one task per partition: drop repeated pairs, attach the left row's key and global columns
   (read from its shard's intermediate file: a column projection, not a shuffle of the dataset)
   with one ``take``; split by the right row's shard, sorted by the right row;
4. verify, one task per partition: for each right shard's slice of each piece, take the right
   rows' columns and call ``verify``.

Tasks are at most ``MAX_MAPS`` x ``MAX_PARTS`` objects (Ray tracks each); ``parts`` is twice the
cluster's CPUs up to ``MAX_PARTS``.

Only the verified edges, the duplicate pairs as key strings, come back to the driver, where
:func:`stages.base.components` keeps the smallest key of every component, exactly as the reference.
Other global stages (top-fraction selection) collect ``key`` + their few ``global_columns`` of the
kept rows on the driver and call ``decide``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from mmcurate.dedup.cluster import ClusterStage
from mmcurate.dedup.graph import components, member_pairs, shared_groups, sorted_distinct, verify_aligned
from mmcurate.dedup.hashing import mix64
from mmcurate.engines.intermediate import columns_schema, kept_rows
from mmcurate.engines.run import RunContext
from mmcurate.engines.worker_state import ready
from mmcurate.stages.base import GlobalStage, decisions

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
EDGES = pa.schema([("a", pa.string()), ("b", pa.string())])
# The shuffle makes MAX_MAPS x MAX_PARTS objects at most: Ray tracks each one.
MAX_MAPS = 1024
MAX_PARTS = 256


def shard_dataset(ids: list[int], blocks: int | None = None) -> ray.data.Dataset:
    """The seed of every per-shard Ray Data plan: the shard ids in ``blocks`` blocks (default: one
    block per shard)."""
    return ray.data.from_items([{"shard": i} for i in ids], override_num_blocks=max(1, min(len(ids), blocks or len(ids))))


def global_decisions(ctx: RunContext, index: int) -> pa.Table:
    """The decision table of the global stage that ends segment ``index``."""
    stage = ctx.segments[index].global_stage
    if not ctx.reader.shards:  # an empty input: nothing to decide
        return decisions([], "")
    ids = [p.shard_id for p in ctx.reader.shards]
    if not isinstance(stage, ClusterStage):
        rows = shard_dataset(ids).map_batches(_kept_rows, fn_kwargs={"ctx": ctx, "segment": index, "stage": stage}, batch_format="pyarrow", batch_size=None)
        stage.setup()
        return stage.decide(_collect(rows, columns_schema(ctx, index, stage)))
    edges = pa.concat_tables([EDGES.empty_table(), *ray.get(_edge_refs(ctx, index, stage, ids))])
    keys, keepers = components(np.array(edges.column("a").to_pylist(), dtype=object), np.array(edges.column("b").to_pylist(), dtype=object))
    return decisions(keys, stage.reason, keepers)


def _edge_refs(ctx: RunContext, segment: int, stage: ClusterStage, ids: list[int]) -> list[ray.ObjectRef]:
    """Submit the four steps; return the refs of the verify tasks' edge tables."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    parts = max(1, min(len(ids), 2 * cpus, MAX_PARTS))
    args = (ray.put(ctx), segment, stage)
    left_schema = _left_schema(columns_schema(ctx, segment, stage), stage)
    maps = np.array_split(np.array(ids), max(1, min(len(ids), 4 * cpus, MAX_MAPS)))
    bands = [_submit(_bands, parts, *args, [int(i) for i in shard_ids], parts) for shard_ids in maps]
    pairs = [_submit(_pairs, parts, *args, parts, *(b[p] for b in bands)) for p in range(parts)]
    left = [_submit(_left, parts, *args, parts, left_schema, *(q[p] for q in pairs)) for p in range(parts)]
    return [_verify.remote(*args, left_schema, *(lt[p] for lt in left)) for p in range(parts)]


def _submit(task: ray.remote_function.RemoteFunction, parts: int, *args: object) -> list[ray.ObjectRef]:
    """Run ``task`` returning ``parts`` objects; their refs as a list (also for one part)."""
    refs = task.options(num_returns=parts).remote(*args)
    return refs if parts > 1 else [refs]


def _grouping(part: np.ndarray, parts: int, within: np.ndarray | None = None) -> tuple[np.ndarray, list[slice]]:
    """The order that groups rows by ``part`` (then by ``within``), and each of the ``parts``
    pieces as a slice of that order."""
    order = np.lexsort((within, part)) if within is not None else np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return order, [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def _split(columns: Sequence[np.ndarray], part: np.ndarray, parts: int) -> list[tuple[np.ndarray, ...]]:
    """Rows of the aligned ``columns`` grouped by ``part`` into ``parts`` pieces."""
    order, pieces = _grouping(part, parts)
    ordered = [c[order] for c in columns]
    return [tuple(c[piece] for c in ordered) for piece in pieces]


def _by_part(pieces: list) -> list | object:
    """What a task with ``num_returns=len(pieces)`` returns."""
    return pieces if len(pieces) > 1 else pieces[0]


def _concat(chunks: Sequence[tuple[np.ndarray, ...]], width: int) -> list[np.ndarray]:
    return [np.concatenate([c[i] for c in chunks]) if chunks else np.empty(0, np.int64) for i in range(width)]


@ray.remote
def _bands(ctx: RunContext, segment: int, stage: ClusterStage, shard_ids: list[int], parts: int) -> list | object:
    """``(group, id)`` of some shards' kept rows, split by group."""
    groups, ids = [], []
    for shard_id in shard_ids:
        rows = kept_rows(ctx, segment, stage, shard_id)
        found = ready(stage).group_keys(rows)
        groups.append(found.column("group").to_numpy().astype(np.int64))
        ids.append((shard_id << ROW_BITS) | pc.index_in(found.column("key"), value_set=rows.column("key")).to_numpy(zero_copy_only=False).astype(np.int64))
    group, ids = np.concatenate(groups), np.concatenate(ids)
    return _by_part(_split((group, ids), (mix64(group) % np.uint64(parts)).astype(np.int64), parts))


@ray.remote
def _pairs(ctx: RunContext, segment: int, stage: ClusterStage, parts: int, *chunks: tuple[np.ndarray, np.ndarray]) -> list | object:
    """Candidate pairs ``(a id, b id)`` of one partition's groups, split by the left row's shard."""
    group, ids = _concat(chunks, 2)
    rows, run = shared_groups(group)
    distinct, codes = np.unique(ids[rows], return_inverse=True)
    center = functools.partial(_smallest_key, _shard_keys(ctx, segment, stage), distinct)
    left, right = member_pairs(run, codes.astype(np.int64), stage.max_group_size, center)
    a, b = distinct[left], distinct[right]
    return _by_part(_split((a, b), (a >> ROW_BITS) % parts, parts))


def _shard_keys(ctx: RunContext, segment: int, stage: ClusterStage) -> Callable[[int], pa.Array]:
    @functools.cache
    def keys(shard_id: int) -> pa.Array:
        return kept_rows(ctx, segment, stage, shard_id, keys_only=True).column("key").combine_chunks()

    return keys


def _smallest_key(shard_keys: Callable[[int], pa.Array], distinct: np.ndarray, members: np.ndarray) -> int:
    """The member code (index into ``distinct`` ids) of the smallest key."""
    keys = [shard_keys(int(i >> ROW_BITS))[int(i & ROW_MASK)].as_py() for i in distinct[members]]
    return int(members[min(range(len(keys)), key=keys.__getitem__)])


def _left_schema(columns: pa.Schema, stage: ClusterStage) -> pa.Schema:
    """Pairs after step 3: the left key, the right id, the left row's global columns as ``_a_<column>``."""
    return pa.schema([("a", pa.string()), ("b", pa.int64()), *(columns.field(c).with_name(f"_a_{c}") for c in stage.global_columns)])


@ray.remote
def _left(ctx: RunContext, segment: int, stage: ClusterStage, parts: int, schema: pa.Schema, *chunks: tuple[np.ndarray, np.ndarray]) -> list | object:
    """Distinct pairs with the left row's key and global columns, split by the right row's shard and
    sorted by the right row. The wide global columns are copied once, by one ``take``."""
    a, b = _distinct(*_concat(chunks, 2))
    runs = _shard_runs(a)
    if not runs:
        return _by_part([schema.empty_table()] * parts)
    tables = [kept_rows(ctx, segment, stage, shard_id) for shard_id, _ in runs]
    offsets = np.cumsum([0] + [t.num_rows for t in tables])
    position = np.concatenate([offsets[i] + (a[run] & ROW_MASK) for i, (_, run) in enumerate(runs)])
    order, pieces = _grouping((b >> ROW_BITS) % parts, parts, within=b)
    side = pa.concat_tables(tables).combine_chunks().take(pa.array(position[order]))
    table = pa.Table.from_arrays([side.column("key"), pa.array(b[order]), *(side.column(c) for c in stage.global_columns)], schema=schema)
    return _by_part([table.slice(piece.start, piece.stop - piece.start) for piece in pieces])


@ray.remote
def _verify(ctx: RunContext, segment: int, stage: ClusterStage, schema: pa.Schema, *chunks: pa.Table) -> pa.Table:
    """The partition's pairs that ``stage.verify`` confirms, as ``(a key, b key)``. Each left task's
    piece is sorted by the right row: the pairs of one right shard are a slice of it."""
    shard_rows = functools.cache(lambda shard_id: kept_rows(ctx, segment, stage, shard_id).combine_chunks())
    columns = list(stage.global_columns)
    edges = [EDGES.empty_table()]
    for chunk in chunks:
        right = chunk.column("b").to_numpy()
        for shard_id, run in _shard_runs(right):
            pairs = chunk.slice(run.start, run.stop - run.start)
            side = shard_rows(shard_id).take(pa.array(right[run] & ROW_MASK))
            left = pairs.select([f"_a_{c}" for c in columns]).rename_columns(columns)
            ok = verify_aligned(ready(stage), left, side.select(columns))
            edges.append(pa.Table.from_arrays([pairs.column("a"), side.column("key")], schema=EDGES).filter(pa.array(ok)))
    return pa.concat_tables(edges)


def _distinct(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs ``(a[i], b[i])`` of ids, sorted by ``a``."""
    distinct_a, code_a = np.unique(a, return_inverse=True)
    distinct_b, code_b = np.unique(b, return_inverse=True)
    code_a, code_b = sorted_distinct(code_a.astype(np.int64), code_b.astype(np.int64))
    return distinct_a[code_a], distinct_b[code_b]


def _shard_runs(ids: np.ndarray) -> list[tuple[int, slice]]:
    """``(shard, slice)`` of each run of one shard's ids in ``ids``, sorted ids."""
    if not len(ids):
        return []
    shards = ids >> ROW_BITS
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
    return [(int(shards[lo]), slice(lo, hi)) for lo, hi in zip(starts, np.r_[starts[1:], len(ids)], strict=True)]


def _collect(ds: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables([t.select(schema.names) for t in parts]) if parts else schema.empty_table()


def _kept_rows(batch: pa.Table, ctx: RunContext, segment: int, stage: GlobalStage) -> pa.Table:
    return pa.concat_tables([kept_rows(ctx, segment, stage, i) for i in batch.column("shard").to_pylist()])
