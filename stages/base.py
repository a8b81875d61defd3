"""The one stage abstraction: an Arrow table of samples in, the same rows with columns added out.

A stage never imports an engine. Engines (``mmcurate.engines``) call, per worker, ``setup()`` once
and then ``process()`` on batches of *kept* rows; they move newly rejected rows to the rejects
ledger. Global stages (dedup, top-fraction selection) add a second step, ``decide()``, that sees
the ``key`` and ``global_columns`` of every kept row of the dataset and names the keys to reject.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse
import scipy.sparse.csgraph
import yaml

from mmcurate.errors import UsageError


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
    resources: ClassVar[Resources] = Resources()
    needs: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()
    batch_size: ClassVar[int | None] = None  # rows per process() call; None: the whole shard

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> Stage:
        return cls(build_config(cls.Config, params or {}, f"stage {cls.name}"))

    def setup(self) -> None:
        """Load models and other per-worker state. Called once per worker, before any batch."""

    def process(self, batch: pa.Table) -> pa.Table:
        """Return ``batch`` with the ``adds`` columns and ``reject_reason`` set on rejected rows."""
        raise NotImplementedError


class GlobalStage(Stage):
    """A stage whose decision needs the whole dataset (dedup, top-fraction selection).

    ``process`` adds per-row signature columns (it may reject rows, e.g. ones it cannot hash);
    ``decide`` receives ``key`` plus ``global_columns`` of every kept row and returns a table
    ``(key, reject_reason, duplicate_of)`` naming the rows to reject. Removal is always by key.
    """

    global_columns: ClassVar[tuple[str, ...]] = ()

    def decide(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError


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


# ---------------------------------------------------------------------------------------------
# Typed, validated configs built from YAML mappings or ``--set key=value`` strings.


def build_config(cls: type, params: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``params``, checking names and types; raise UsageError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise UsageError(f"{where}: unknown option {unknown[0]!r} (options: {', '.join(fields) or 'none'})")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], f"{where}: option {name!r}") for name, value in params.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` (possibly a ``--set`` string) to the annotated type, or raise UsageError."""
    if isinstance(value, str) and hint is not str:
        parsed = yaml.safe_load(value) if value.strip() else value
        if not (isinstance(parsed, str) and _accepts_str(hint)):
            value = parsed
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise UsageError(f"{where} must be one of {', '.join(map(str, args))}, not {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        return origin(_coerce(v, item, where) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"{where} must be a mapping, not {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be true or false, not {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"{where} must be a number, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be an integer, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{where} must be a string, not {value!r}")
    return value


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return any(isinstance(a, str) for a in typing.get_args(hint))
    return False


class ClusterStage(GlobalStage):
    """A global stage that removes near-duplicates: candidate groups, verified pairs, components.

    Subclasses implement ``group_keys`` (which rows may be duplicates: exact hash, LSH band buckets,
    pHash chunks) and, where candidates need checking, ``verify``. ``decide`` below is the in-memory
    reference; the Ray and Spark engines run the same three steps distributed and must agree with it.
    In every connected component of verified pairs the smallest key is kept and the others are
    rejected with ``reason`` and ``duplicate_of`` = that key.
    """

    reason: ClassVar[str] = "duplicate"
    max_group_size: ClassVar[int] = 1000  # candidate groups larger than this pair only with their smallest key

    def group_keys(self, table: pa.Table) -> pa.Table:
        """``(key string, group int64)`` rows: rows sharing a group are candidate duplicates."""
        raise NotImplementedError

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        """For aligned rows of ``left`` and ``right`` (``global_columns``), whether each pair is a duplicate."""
        return pa.array(np.ones(left.num_rows, dtype=bool))

    def decide(self, table: pa.Table) -> pa.Table:
        # candidate_pairs -> verified_edges -> components, on integer key codes rather than strings.
        keys, left, right = _pair_codes(self.group_keys(table), self.max_group_size)
        rows = pc.index_in(keys, value_set=table.column("key")).to_numpy(zero_copy_only=False)
        ok = _verify_rows(self, table, rows[left], rows[right])
        dups, keepers = _component_codes(len(keys), left[ok], right[ok])
        return decisions(keys.take(pa.array(dups)), self.reason, keys.take(pa.array(keepers)))


VERIFY_BATCH = 65_536  # candidate pairs handed to one verify() call: bounds memory, stays in cache


def candidate_pairs(groups: pa.Table, max_group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Key pairs ``(a, b)``, ``a < b``, of rows sharing a group: every pair in small groups, and each
    member with the group's smallest key in groups larger than ``max_group_size``. Sorted, distinct."""
    keys, left, right = _pair_codes(groups, max_group_size)
    return _strings(keys, left), _strings(keys, right)


def _pair_codes(groups: pa.Table, max_group_size: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """:func:`candidate_pairs` as ``(sorted distinct keys, left codes, right codes)``, codes indexing the keys."""
    rows, run = shared_groups(groups.column("group").to_numpy())
    keys, codes = _key_codes(groups.column("key").take(pa.array(rows)))
    left, right = member_pairs(run, codes, max_group_size)
    return keys, left, right


def shared_groups(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of groups with two or more members, ordered by group, and each one's group number
    (0, 1, ... in group order). Most groups are singletons: they are dropped before any pairing."""
    order = np.argsort(group)
    run = np.cumsum(np.r_[False, group[order][1:] != group[order][:-1]]) if len(group) else np.empty(0, np.int64)
    shared = np.bincount(run)[run] > 1 if len(run) else np.empty(0, bool)
    return order[shared], run[shared]


def member_pairs(
    run: np.ndarray, codes: np.ndarray, max_group_size: int, center: Callable[[np.ndarray], int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``(a, b)``, ``a < b``, of non-negative int ``codes`` sharing a ``run`` (group number):
    every pair in groups of up to ``max_group_size`` members, and in larger groups each member with
    the group's ``center`` (of its member codes; by default the smallest code)."""
    run, codes = sorted_distinct(run, codes)
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]]) if len(run) else np.empty(0, np.int64)
    lengths = np.diff(np.r_[starts, len(run)])
    # Groups with the same members (copies share every LSH band) give the same pairs: expand one of
    # them. Member sets are compared by a 64-bit fingerprint (a collision is ~2**-64 per pair of groups).
    fingerprint = np.add.reduceat(mix64(codes), starts) ^ mix64(lengths) if len(starts) else np.empty(0, np.uint64)
    first = np.zeros(len(starts), bool)
    first[np.unique(fingerprint, return_index=True)[1]] = True
    run, codes = run[np.repeat(first, lengths)], codes[np.repeat(first, lengths)]
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]]) if len(run) else np.empty(0, np.int64)
    lengths = np.diff(np.r_[starts, len(run)])
    if center is not None:  # move each large group's center to its first place
        for start, length in zip(starts[lengths > max_group_size], lengths[lengths > max_group_size], strict=True):
            members = codes[start : start + length]
            at = start + int(np.flatnonzero(members == center(members))[0])
            codes[start], codes[at] = codes[at], codes[start]
    sizes = np.repeat(lengths, lengths)
    position = np.arange(len(run)) - np.repeat(starts, lengths)
    # Members pair with every later member; in a large group only the first member pairs, with all.
    partners = np.where(sizes > max_group_size, np.where(position == 0, sizes - 1, 0), sizes - 1 - position)
    left = np.repeat(codes, partners)
    offset = np.arange(len(left)) - np.repeat(np.cumsum(partners) - partners, partners)
    right = codes[np.repeat(np.arange(len(codes)) + 1, partners) + offset]
    return sorted_distinct(np.minimum(left, right), np.maximum(left, right))


def mix64(values: np.ndarray) -> np.ndarray:
    """A 64-bit mix of non-negative ints (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        x = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sorted_distinct(major: np.ndarray, minor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(major, minor)`` pairs of non-negative ints, sorted: one sort of the pairs packed
    into int64, much faster than lexsort or np.unique."""
    span = int(minor.max()) + 1 if len(minor) else 1
    if len(major) and int(major.max()) >= np.iinfo(np.int64).max // span:
        raise ValueError("too many candidate rows to pack into int64")
    packed = np.sort(major.astype(np.int64) * span + minor)
    packed = packed[np.r_[True, packed[1:] != packed[:-1]]] if len(packed) else packed
    return packed // span, packed % span


def _key_codes(keys: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """The distinct keys in sorted order, and each key's index among them (code order = key order)."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    distinct = pc.unique(keys)
    distinct = distinct.take(pc.sort_indices(distinct))
    return distinct, pc.index_in(keys, value_set=distinct).to_numpy(zero_copy_only=False).astype(np.int64)


def _strings(keys: pa.Array, codes: np.ndarray) -> np.ndarray:
    return keys.take(pa.array(codes, pa.int64())).to_numpy(zero_copy_only=False).astype(object)


def verified_edges(stage: ClusterStage, table: pa.Table, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs that ``stage.verify`` confirms."""
    if len(left) == 0:
        return left, right
    rows = pc.index_in(pa.array(np.concatenate([left, right]), pa.string()), value_set=table.column("key")).to_numpy(zero_copy_only=False)
    ok = _verify_rows(stage, table, rows[: len(left)], rows[len(left) :])
    return left[ok], right[ok]


def _verify_rows(stage: ClusterStage, table: pa.Table, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``stage.verify`` on the pairs of rows ``(a[i], b[i])`` of ``table``, in slices of ``VERIFY_BATCH`` pairs."""
    columns = table.select(list(stage.global_columns))
    ok = np.zeros(len(a), bool)
    for i in range(0, len(a), VERIFY_BATCH):
        part = slice(i, i + VERIFY_BATCH)
        ok[part] = verify_aligned(stage, columns.take(a[part]), columns.take(b[part]))
    return ok


def verify_aligned(stage: ClusterStage, left: pa.Table, right: pa.Table) -> np.ndarray:
    """``stage.verify`` on the aligned rows of ``left`` and ``right``, in slices of ``VERIFY_BATCH``
    pairs; an undecided (null) pair is not a duplicate."""
    ok = np.zeros(left.num_rows, bool)
    for i in range(0, left.num_rows, VERIFY_BATCH):
        verdict = stage.verify(left.slice(i, VERIFY_BATCH), right.slice(i, VERIFY_BATCH))
        ok[i : i + VERIFY_BATCH] = np.asarray(pc.fill_null(verdict, False), dtype=bool)
    return ok


def components(left: np.ndarray, right: np.ndarray) -> tuple[list[str], list[str]]:
    """Connected components of the edges: every non-smallest key with its component's smallest key."""
    if len(left) == 0:
        return [], []
    keys, codes = _key_codes(pa.array(np.concatenate([left, right]), pa.string()))
    dups, keepers = _component_codes(len(keys), codes[: len(left)], codes[len(left) :])
    return keys.take(pa.array(dups)).to_pylist(), keys.take(pa.array(keepers)).to_pylist()


def _component_codes(n: int, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`components` on key codes ``0..n-1`` (code order = key order): ``(duplicates, their keepers)``."""
    if len(left) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(len(left), np.int8), (left, right)), shape=(n, n))
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1, n, np.int64)
    np.minimum.at(smallest, labels, np.arange(n))
    keeper = smallest[labels]
    dups = np.flatnonzero(keeper != np.arange(n))
    return dups, keeper[dups]
