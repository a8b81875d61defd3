"""The output folder layout and atomic file writes, through fsspec. :class:`OutputDir` is the only
place that knows the layout's names:

```
OUT/run.json                 resolved config, versions, engine, start/end
OUT/shards/{id:05d}.tar      WebDataset (or shards/{id:05d}.parquet with image bytes)
OUT/shards/sizes.json        samples per tar
OUT/meta/{id:05d}.parquet    every column but the image bytes (tar output only)
OUT/rejects/{id:05d}.parquet rejected rows with reject_stage, reject_reason, duplicate_of
OUT/_stats/{id:05d}.json     rows in / kept / rejected by stage and reason, timings
OUT/_done/{id:05d}           written last: the run id and the sizes of the shard's files; a re-run skips
                             shards whose marker names its run and files that are unchanged
OUT/_work/                   parsed input (_work/input/) and intermediate state, marked as mmcurate's by _work/.mmcurate-work
OUT/_input/                  an input mmcurate generated for the run (the demo's URL list), kept with the run that
                             names it; marked as mmcurate's by _input/.mmcurate-input
```
"""

from __future__ import annotations

import json
import re
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from mmcurate import killpoints
from mmcurate.errors import UsageError
from mmcurate.schemas import METADATA_KEY, SCHEMA_VERSION
from mmcurate.shards import jsontext
from mmcurate.shards.storage import url_to_fs

RUN_JSON = "run.json"
SHARDS, META, REJECTS, STATS, DONE, WORK = "shards", "meta", "rejects", "_stats", "_done", "_work"
WORK_MARK = ".mmcurate-work"  # marks a work folder mmcurate created (it removes only such a folder)
WORK_INPUT = "input"  # the work folder's parsed URL lists
INPUT, INPUT_MARK = "_input", ".mmcurate-input"  # an input mmcurate generated, and the mark of its folder
SHARD_FOLDERS = (SHARDS, META, REJECTS, STATS, DONE)
_SHARD_FILES = ((SHARDS, ".tar"), (SHARDS, ".parquet"), (META, ".parquet"), (REJECTS, ".parquet"), (STATS, ".json"))
_TMP = re.compile(r"\.tmp-[0-9a-f]+-")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


@contextmanager
def open_parquet(fs: AbstractFileSystem, path: str, *, stream: bool = False) -> Iterator[pq.ParquetFile]:
    """A Parquet file on any fsspec filesystem; local files are opened by pyarrow itself. With
    ``stream`` its batches are read one row group at a time through a 1 MiB buffer (pyarrow would
    otherwise read the column chunks of every row group at once): about twice a row group in memory.

    Through a Python file object, Arrow's IO threads hold Python buffers that they may release while
    the interpreter shuts down, which aborts the process ("terminate called without an active
    exception", apache/arrow#49942) and turns a clean exit code into 134.
    """
    options = {"pre_buffer": False, "buffer_size": 1 << 20} if stream else {}
    if isinstance(fs, LocalFileSystem):
        with pq.ParquetFile(path, **options) as pf:
            yield pf
    else:
        with fs.open(path, "rb") as f, pq.ParquetFile(f, **options) as pf:
            yield pf


# A file that is not what its name says: truncated, garbled, or JSON / Parquet of the wrong shape.
_DAMAGE = (ValueError, TypeError, KeyError, EOFError, tarfile.TarError, pa.ArrowException)


@contextmanager
def reading(fs: AbstractFileSystem, path: str) -> Iterator[None]:
    """Reads of ``path``, a file of a dataset: a missing, truncated or garbled file is a one-line UsageError
    naming it, not a traceback (on an object store an OSError may be the network's, not the file's: it is
    raised as it is)."""
    try:
        yield
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; the output is incomplete or damaged") from None
    except _DAMAGE as e:
        raise UsageError(f"{path}: damaged ({_first_line(e)})") from None
    except OSError as e:
        if not isinstance(fs, LocalFileSystem):
            raise
        raise UsageError(f"{path}: unreadable ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass(frozen=True)
class OutputDir:
    """An output folder on any fsspec filesystem; ``run_id`` (from its ``run.json``) ties done markers to the run."""

    fs: AbstractFileSystem
    root: str
    run_id: str | None = None

    @classmethod
    def open(cls, url: str) -> OutputDir:
        return cls.at(*url_to_fs(url))

    @classmethod
    def at(cls, fs: AbstractFileSystem, root: str) -> OutputDir:
        """The output folder ``root`` of ``fs``, tied to the run its ``run.json`` records."""
        out = cls(fs, root.rstrip("/") or "/")  # "/" (a filesystem's root) is a folder, not "" (the current one)
        try:
            record = out.read_json(out.run_json)
        except (OSError, ValueError):
            return out
        return cls(out.fs, out.root, record.get("run_id") if isinstance(record, dict) else None)

    def path(self, *parts: str) -> str:
        return "/".join((self.root.rstrip("/"), *parts)) if parts else self.root

    def shard_path(self, folder: str, shard_id: int, ext: str) -> str:
        return self.path(folder, f"{shard_name(shard_id)}{ext}")

    @property
    def run_json(self) -> str:
        return self.path(RUN_JSON)

    def tar_path(self, shard_id: int) -> str:
        """A WebDataset shard: the kept rows' samples."""
        return self.shard_path(SHARDS, shard_id, ".tar")

    def meta_path(self, shard_id: int) -> str:
        """The kept rows of a WebDataset shard, but the image bytes."""
        return self.shard_path(META, shard_id, ".parquet")

    def parquet_path(self, shard_id: int) -> str:
        """The kept rows of a Parquet shard, image bytes included."""
        return self.shard_path(SHARDS, shard_id, ".parquet")

    def kept_path(self, shard_id: int) -> str:
        """The Parquet file of a shard's kept rows: ``meta/`` beside a tar, else the Parquet shard."""
        return self.meta_path(shard_id) if self.exists(self.tar_path(shard_id)) else self.parquet_path(shard_id)

    def rejects_path(self, shard_id: int) -> str:
        return self.shard_path(REJECTS, shard_id, ".parquet")

    def stats_path(self, shard_id: int) -> str:
        return self.shard_path(STATS, shard_id, ".json")

    def done_path(self, shard_id: int) -> str:
        return self.shard_path(DONE, shard_id, "")

    def sizes_path(self) -> str:
        """Samples per tar (open_clip's training reads it for the dataset size)."""
        return self.path(SHARDS, "sizes.json")

    def work_path(self, *parts: str) -> str:
        """A file of the run's work folder (parsed input, intermediates)."""
        return self.path(WORK, *parts)

    def local_work_folder(self, name: str) -> str | None:
        """The work folder's ``NAME/``, created empty, for files that the run's processes on this machine
        map into memory; None when the output is not on this machine's file system."""
        if not isinstance(self.fs, LocalFileSystem):
            return None
        path = self.work_path(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.fs.makedirs(path, exist_ok=True)
        return path

    def kept_files(self) -> list[str]:
        """The Parquet files of the kept rows, in shard order (``meta/``, else the Parquet shards)."""
        return self._files(META, "*.parquet") or self._files(SHARDS, "*.parquet")

    def stored_schema(self) -> pa.Schema | None:
        """The schema of the kept rows, read from the first kept file (a run writes one schema); None before one is written."""
        kept = self.kept_files()
        if not kept:
            return None
        with open_parquet(self.fs, kept[0]) as pf:
            return pf.schema_arrow

    def stored_columns(self) -> list[str]:
        """The names of :meth:`stored_schema` (none before a kept file is written)."""
        schema = self.stored_schema()
        return schema.names if schema is not None else []

    def tar_files(self) -> list[str]:
        return self._files(SHARDS, "*.tar")

    def rejects_files(self) -> list[str]:
        return self._files(REJECTS, "*.parquet")

    def _files(self, folder: str, pattern: str) -> list[str]:
        """The files of ``folder`` matching ``pattern``, sorted, temporaries of unfinished writes left out
        (on an object store a killed write can leave one: a rename there is a copy, then a delete)."""
        return sorted(p for p in self.fs.glob(self.path(folder, pattern)) if not is_partial_write(p.rsplit("/", 1)[-1]))

    def found_shard_ids(self) -> list[int]:
        """Ids of the shards with any file in the output (a crashed or damaged run may lack some)."""
        return sorted({i for folder in SHARD_FOLDERS for i in self.shard_ids(folder)})

    @contextmanager
    def open_atomic(self, path: str) -> Iterator[Any]:
        """A binary file that appears at ``path`` only when the block ends without an error: it is
        written under a temporary name in the same folder, then renamed."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = temporary_path(path)
        with self.fs.open(tmp, "wb") as f:
            yield f
        killpoints.reached("write")
        self.fs.mv(tmp, path)

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        """Write ``data`` to ``path`` atomically (:meth:`open_atomic`)."""
        with self.open_atomic(path) as f:
            f.write(data)

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of writes that a killed run left unfinished."""
        for path in self.fs.glob(self.path("**", ".tmp-*")):
            if is_partial_write(path.rsplit("/", 1)[-1]):
                self.fs.rm(path)

    def run_record(self) -> dict | None:
        """The folder's ``run.json`` (None if there is none); UsageError if it is not a run record."""
        path = self.run_json
        try:
            record = self.read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise UsageError(f"{path} is unreadable ({e}); use a new output folder") from None
        if not isinstance(record, dict) or not isinstance(record.get("pipeline"), dict) or not isinstance(record.get("shards"), int):
            raise UsageError(f"{path} is not an mmcurate run record; use a new output folder")
        return record

    def entries(self) -> set[str]:
        """Names in the folder (none if it does not exist); UsageError if the path is a file."""
        if not self.fs.exists(self.root):
            return set()
        if not self.fs.isdir(self.root):
            raise UsageError(f"output {self.root} is a file, not a folder")
        return self._names(self.root)

    def _names(self, folder: str) -> set[str]:
        """Names of the entries of the folder ``folder`` (a path)."""
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)}

    def owns_work(self) -> bool:
        """Whether ``_work/`` is a work folder mmcurate created (or an empty one, left by a start killed before its marker)."""
        return self._owns(WORK, WORK_MARK)

    def owns_input(self) -> bool:
        """Whether ``_input/`` is a folder mmcurate created (or an empty one, left by a write killed before its marker)."""
        return self._owns(INPUT, INPUT_MARK)

    def _owns(self, folder: str, mark: str) -> bool:
        path = self.path(folder)
        return self.exists(self.path(folder, mark)) or (self.fs.isdir(path) and not self.fs.ls(path, detail=False))

    def write_input(self, name: str, data: bytes) -> str:
        """Write ``_input/NAME``, an input mmcurate generates for the run (the demo's URL list), and return its
        path; a file that holds ``data`` already is left as it is (run.json records its modification time).
        UsageError if the output holds an ``_input`` that mmcurate did not create."""
        path = self.path(INPUT, name)
        self._refuse_foreign(INPUT, INPUT_MARK, "use a new output folder")
        if self.exists(path) and self.fs.cat_file(path) == data:
            return path
        try:
            if not self.exists(self.path(INPUT, INPUT_MARK)):
                self._mark(INPUT, INPUT_MARK, b"an input mmcurate generated for the run in this folder, which run.json names\n")
            self.write_bytes(path, data)
        except OSError as e:
            raise UsageError(f"cannot write to the output folder {self.root}: {e.strerror or e}") from None
        return path

    def remove_input(self) -> None:
        """Delete the inputs mmcurate generated here (never an ``_input/`` that mmcurate did not create)."""
        if self.owns_input():
            self.fs.rm(self.path(INPUT), recursive=True)

    def check_work(self) -> None:
        """UsageError if the output holds a ``_work`` that mmcurate did not create (which it never writes into or removes)."""
        self._refuse_foreign(WORK, WORK_MARK, f"move it out of the output folder, whose {WORK} is mmcurate's work folder")

    def _refuse_foreign(self, folder: str, mark: str, hint: str) -> None:
        """UsageError (ending in ``hint``) if the output holds a ``folder`` that mmcurate did not create (:meth:`_owns`)."""
        if self.exists(self.path(folder)) and not self._owns(folder, mark):
            raise UsageError(f"{self.path(folder)} holds files mmcurate did not write (no {mark}); {hint}")

    def _mark(self, folder: str, mark: str, text: bytes) -> None:
        """Create ``folder`` and write its ``mark`` (in place: even a half-written mark marks the folder)."""
        self.fs.makedirs(self.path(folder), exist_ok=True)
        with self.fs.open(self.path(folder, mark), "wb") as f:
            f.write(text)

    def claim(self) -> None:
        """Create the folder and mark its work folder as mmcurate's; UsageError if it cannot be written or
        holds a ``_work`` that is not mmcurate's (:meth:`check_work`)."""
        self.check_work()
        try:
            if not self.owns_work():
                self._mark(WORK, WORK_MARK, b"mmcurate's work folder: removed when the run finishes\n")
        except OSError as e:
            raise UsageError(f"cannot write to the output folder {self.root}: {e.strerror or e}") from None

    def wrote_results(self) -> bool:
        """Whether a run wrote more than its record and parsed input here: a file in a shard folder or an
        intermediate in the work folder (temporaries of unfinished writes aside)."""
        folders = {folder: () for folder in SHARD_FOLDERS} | {WORK: (WORK_MARK, WORK_INPUT)}
        return any(
            name not in ignored and not is_partial_write(name)
            for folder, ignored in folders.items()
            if self.fs.isdir(self.path(folder))
            for name in self._names(self.path(folder))
        )

    def remove_work(self) -> None:
        """Delete mmcurate's work folder (never a ``_work/`` that mmcurate did not create)."""
        if self.owns_work():
            self.fs.rm(self.path(WORK), recursive=True)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (jsontext.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.load(f)

    def write_parquet(self, path: str, table: pa.Table, row_group_rows: int | None = None) -> None:
        """Write ``table`` atomically with the schema version in the file metadata, in row groups of
        ``row_group_rows`` (default: pyarrow's)."""
        metadata = dict(table.schema.metadata or {})
        metadata[METADATA_KEY] = SCHEMA_VERSION.encode()
        table = table.replace_schema_metadata(metadata)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd")
        self.write_bytes(path, memoryview(sink.getvalue()))

    def write_scratch(self, path: str, table: pa.Table) -> None:
        """Write an intermediate this run reads back, atomically, as an Arrow IPC file: no encoding, so
        writing it is a copy and a local reader maps it into memory (:meth:`read_scratch`)."""
        with self.open_atomic(path) as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)

    def read_scratch(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """The ``columns`` (default: all) of a file :meth:`write_scratch` wrote; a local one mapped, not read."""
        if isinstance(self.fs, LocalFileSystem):
            table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        else:
            with self.fs.open(path, "rb") as f:
                reader = pa.ipc.open_file(f)
                if columns is not None:  # read those columns' buffers alone, not the whole file
                    fields = [reader.schema.get_field_index(name) for name in columns]
                    reader = pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=fields))
                table = reader.read_all()
        return table if columns is None else table.select(columns)

    def scratch_schema(self, path: str) -> pa.Schema:
        """The schema of a file :meth:`write_scratch` wrote."""
        with self.fs.open(path, "rb") as f:
            return pa.ipc.open_file(f).schema

    def write_parquet_stream(self, path: str, tables: Iterable[pa.Table]) -> None:
        """Write a stream of same-schema tables (at least one) as one Parquet file, atomically."""
        writer = None
        with self.open_atomic(path) as f:
            for table in tables:
                if writer is None:
                    schema = table.schema.with_metadata({**(table.schema.metadata or {}), METADATA_KEY: SCHEMA_VERSION.encode()})
                    writer = pq.ParquetWriter(f, schema, compression="zstd")
                writer.write_table(table.cast(writer.schema))
            if writer is not None:
                writer.close()

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """The ``columns`` (default: all) of a Parquet file of the output; UsageError naming a missing or damaged one."""
        with reading(self.fs, path), open_parquet(self.fs, path) as pf:
            return pf.read(columns=columns)

    def parquet_schema(self, path: str) -> pa.Schema:
        """The schema of a Parquet file of the output, read from its footer; UsageError naming a missing or damaged one."""
        with reading(self.fs, path), open_parquet(self.fs, path) as pf:
            return pf.schema_arrow

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def shard_files(self, shard_id: int) -> dict[str, int]:
        """The shard's output files that exist, by path relative to the root, with their sizes."""
        found = {}
        for folder, ext in _SHARD_FILES:
            path = self.shard_path(folder, shard_id, ext)
            if self.fs.exists(path):
                found[f"{folder}/{shard_name(shard_id)}{ext}"] = self.fs.size(path)
        return found

    def is_done(self, shard_id: int) -> bool:
        """Whether the shard's done marker names this run and files that are all there, unchanged in size."""
        files = self.marked_files(shard_id)
        try:
            return bool(files) and all(self.fs.size(self.path(rel)) == size for rel, size in files.items())
        except OSError:
            return False

    def marked_files(self, shard_id: int) -> dict[str, int]:
        """The files (relative path: size) that the shard's done marker lists, when the marker is this run's; else none."""
        try:
            marker = self.read_json(self.done_path(shard_id))
        except (OSError, ValueError):
            return {}
        if not isinstance(marker, dict) or marker.get("run") != self.run_id or not isinstance(marker.get("files"), dict):
            return {}
        return marker["files"]

    def check_intact(self) -> None:
        """UsageError, one line, when a file that a done marker lists is missing (a damaged or partly copied output)."""
        missing = self.missing_files()
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UsageError(f"{missing[0]}{more}: missing, though its shard's done marker lists it; the output is damaged")

    def check_whole(self) -> None:
        """UsageError, one line, unless this output can be read as a whole dataset (as an input, an export, a
        training set): its run finished, and every file its done markers list is there."""
        record = self.run_record()
        if is_unfinished(record):
            done = len(self.shard_ids(DONE))
            raise UsageError(
                f"{self.root} is an unfinished run ({done} shard(s) done): finish it (run its command again) before reading it as a dataset"
            )
        self.check_intact()

    def missing_files(self) -> list[str]:
        """Files that a done marker of this run lists and the output lacks (a damaged or partly copied output),
        found with one listing per folder."""
        folders = [folder for folder in SHARD_FOLDERS if self.fs.exists(self.path(folder))]
        present = {f"{folder}/{name}" for folder in folders for name in self._names(self.path(folder))}
        return [self.path(rel) for i in self.shard_ids(DONE) for rel in self.marked_files(i) if rel not in present]

    def mark_done(self, shard_id: int) -> None:
        """Write the done marker: this run's id and the shard's files with their sizes."""
        self.write_json(self.done_path(shard_id), {"run": self.run_id, "files": self.shard_files(shard_id)})

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


def is_unfinished(record: dict | None) -> bool:
    """Whether the run record ``record`` (None: no run.json) is of a run that has not finished."""
    return record is not None and record.get("finished") is None


def open_output(url: str) -> OutputDir:
    """An mmcurate output to read (inspect, stats, report, diff); UsageError, one line, when ``url`` is not
    one, its run.json is not a run record, or a file that a done marker lists is missing."""
    out = OutputDir.open(url)
    if not out.fs.exists(out.root):
        raise UsageError(f"{url} does not exist")
    names = out.entries()
    if not holds_run(names) and STATS not in names:
        raise UsageError(f"{url} is not an mmcurate output (no {RUN_JSON})")
    out.run_record()
    out.check_intact()
    return out


def temporary_path(path: str, tag: str | None = None) -> str:
    """A temporary name beside ``path`` (``.tmp-HEX-NAME``): readers skip it and a resumed run removes a
    leftover of a killed write. ``tag`` (hex) replaces the random part where takers must agree on the name."""
    parent, name = path.rsplit("/", 1)
    return f"{parent}/.tmp-{tag or uuid.uuid4().hex}-{name}"


def is_partial_write(name: str) -> bool:
    """Whether a file name is one of mmcurate's temporary names (a write not yet renamed)."""
    return _TMP.match(name) is not None


def holds_run(names: set[str]) -> bool:
    """Whether a folder holding ``names`` is an mmcurate output."""
    return RUN_JSON in names or DONE in names


def tar_beside(kept_file: str) -> str | None:
    """The tar of a kept rows' ``meta/ID.parquet`` file (None for a Parquet shard, which holds its images)."""
    folder, sep, name = kept_file.rpartition(f"/{META}/")
    return f"{folder}/{SHARDS}/{name[: -len('.parquet')]}.tar" if sep else None


def detect_layout(fs: AbstractFileSystem, root: str) -> str:
    """``mmcurate``, ``img2dataset`` or ``parquet`` (a file or folder of Parquet files)."""
    if not fs.exists(root):
        raise UsageError(f"{root!r} does not exist")
    if fs.isdir(root):
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        if holds_run(names):
            return "mmcurate"
        if any(n.endswith(".tar") for n in names):
            return "img2dataset"
    return "parquet"
