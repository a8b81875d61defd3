"""The output folder layout and atomic file writes, through fsspec.

```
OUT/run.json                 resolved config, versions, engine, start/end
OUT/shards/{id:05d}.tar      WebDataset (or shards/{id:05d}.parquet with image bytes)
OUT/meta/{id:05d}.parquet    every column but the image bytes (tar output only)
OUT/rejects/{id:05d}.parquet rejected rows with reject_stage, reject_reason, duplicate_of
OUT/_stats/{id:05d}.json     rows in / kept / rejected by stage and reason, timings
OUT/_done/{id:05d}           written last; a re-run skips shards that have it
OUT/_work/                   intermediate state of pipelines with global stages
```
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from mmcurate.schemas import METADATA_KEY, SCHEMA_VERSION


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


@contextmanager
def open_parquet(fs: AbstractFileSystem, path: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file on any fsspec filesystem; local files are opened by pyarrow itself.

    Through a Python file object, Arrow's IO threads hold Python buffers that they may release while
    the interpreter shuts down, which aborts the process ("terminate called without an active
    exception", apache/arrow#49942) and turns a clean exit code into 134.
    """
    if isinstance(fs, LocalFileSystem):
        with pq.ParquetFile(path) as pf:
            yield pf
    else:
        with fs.open(path, "rb") as f, pq.ParquetFile(f) as pf:
            yield pf


@dataclass(frozen=True)
class OutputDir:
    """An output folder on any fsspec filesystem."""

    fs: AbstractFileSystem
    root: str

    @classmethod
    def open(cls, url: str) -> OutputDir:
        fs, root = fsspec.core.url_to_fs(url)
        return cls(fs, root.rstrip("/"))

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def shard_path(self, folder: str, shard_id: int, ext: str) -> str:
        return self.path(folder, f"{shard_name(shard_id)}{ext}")

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically: a temporary name in the same folder, then a rename."""
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of writes that a killed run left unfinished."""
        for path in self.fs.glob(self.path("**", ".tmp-*")):
            self.fs.rm(path)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.load(f)

    def write_parquet(self, path: str, table: pa.Table) -> None:
        """Write ``table`` atomically with the schema version in the file metadata."""
        metadata = dict(table.schema.metadata or {})
        metadata[METADATA_KEY] = SCHEMA_VERSION.encode()
        table = table.replace_schema_metadata(metadata)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(path, sink.getvalue().to_pybytes())

    def write_parquet_stream(self, path: str, tables: Iterable[pa.Table]) -> None:
        """Write a stream of same-schema tables (at least one) as one Parquet file, atomically."""
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
        writer = None
        with self.fs.open(tmp, "wb") as f:
            for table in tables:
                if writer is None:
                    schema = table.schema.with_metadata({**(table.schema.metadata or {}), METADATA_KEY: SCHEMA_VERSION.encode()})
                    writer = pq.ParquetWriter(f, schema, compression="zstd")
                writer.write_table(table.cast(writer.schema))
            if writer is not None:
                writer.close()
        self.fs.mv(tmp, path)

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with open_parquet(self.fs, path) as pf:
            return pf.read(columns=columns)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def is_done(self, shard_id: int) -> bool:
        return self.exists(self.shard_path("_done", shard_id, ""))

    def mark_done(self, shard_id: int) -> None:
        self.write_bytes(self.shard_path("_done", shard_id, ""), b"")

    def shard_ids(self, folder: str) -> list[int]:
        """Ids of the shards with a file in ``folder`` (temporary files ignored)."""
        if not self.fs.exists(self.path(folder)):
            return []
        ids = set()
        for p in self.fs.ls(self.path(folder), detail=False):
            stem = p.rsplit("/", 1)[-1].split(".", 1)[0]
            if stem.isdigit():
                ids.add(int(stem))
        return sorted(ids)
