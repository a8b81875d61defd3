"""Pieces of a global step stored in files by one local process and mapped by another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from mmcurate.engines.pieces import load, store


def test_a_stored_piece_reads_back_equal_without_copying_its_arrays(tmp_path: Path) -> None:
    table = pa.table({"key": ["a", None, "c"], "sig": pa.array([b"x" * 8, None, b"z" * 8], pa.binary(8))})
    piece = (table.slice(1), np.arange(5, dtype=np.int64), np.empty(0, np.int64), np.array([3, 1], np.uint64))
    read = load(store(piece, str(tmp_path)))
    assert read[0].equals(table.slice(1)) and read[0].column("key").to_pylist() == [None, "c"]
    for got, expected in zip(read[1:], piece[1:], strict=True):
        assert got.dtype == expected.dtype and np.array_equal(got, expected) and not got.flags.writeable
    assert load(store([], str(tmp_path))) == []
