"""Toy stages, output readers and a CLI launcher of the foundation tests.

The stages are registered under test-only names (``drop_word``, ``slow``, ``caption_dedup``, ``boom``) by
:func:`register`; ``python -m MODULE ARGS`` runs the real ``mmcurate`` CLI with them
registered, for subprocess tests that need a stage (run those with ``workers: 1``: spawned pool
workers import the unpatched registry).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmcurate.dedup.cluster import ClusterStage
from mmcurate.shards.lease import LEASE
from mmcurate.stages.base import Stage, reject, set_column

MODULE = "mmcurate.tests.support.foundation"  # ``python -m MODULE`` is the CLI with the toy stages
LAION = ("--url-col", "URL", "--caption-col", "TEXT")  # column options of the LAION sample
TOY_STAGES = {
    "drop_word": f"{MODULE}:DropWord",
    "slow": f"{MODULE}:Slow",
    "caption_dedup": f"{MODULE}:CaptionDedup",
    "boom": f"{MODULE}:Boom",
}


@dataclass
class DropWordConfig:
    word: str = "dog"
    mode: str = "filter"

    def __post_init__(self) -> None:
        if not self.word:
            raise ValueError("word must not be empty")
        if self.mode not in ("filter", "score"):
            raise ValueError(f"mode must be filter or score, not {self.mode!r}")


class DropWord(Stage):
    """Rejects rows whose caption contains ``word`` (case-insensitive) as ``has_word``."""

    name = "drop_word"
    Config = DropWordConfig
    needs = ("caption",)
    adds = ("caption_words",)

    def process(self, table: pa.Table) -> pa.Table:
        caption = pc.utf8_lower(pc.fill_null(table.column("caption"), ""))
        words = pc.list_value_length(pc.utf8_split_whitespace(caption))
        table = set_column(table, "caption_words", words, pa.int32())
        if self.config.mode == "score":
            return table
        return reject(table, pc.match_substring(caption, self.config.word.lower()), "has_word")


@dataclass
class SlowConfig:
    seconds: float = 0.3


class Slow(Stage):
    """Sleeps ``seconds`` per shard, so a test can kill a run part-way."""

    name = "slow"
    Config = SlowConfig

    def process(self, table: pa.Table) -> pa.Table:
        time.sleep(self.config.seconds)
        return table


@dataclass
class BoomConfig:
    word: str = "boom"


class Boom(Stage):
    """A stage with a bug: raises on a shard holding a caption with ``word``."""

    name = "boom"
    Config = BoomConfig

    def process(self, table: pa.Table) -> pa.Table:
        if any(self.config.word in (c or "") for c in table.column("caption").to_pylist()):
            raise RuntimeError("boom")
        return table


@dataclass
class CaptionDedupConfig:
    hold: str = ""  # a file: verify waits while it exists, so a test can kill a run in its global step


class CaptionDedup(ClusterStage):
    """Exact caption dedup through the ClusterStage machinery, with an internal signature column."""

    name = "caption_dedup"
    Config = CaptionDedupConfig
    needs = ("caption",)
    global_columns = ("_caption_hash",)
    reason = "duplicate_caption"

    def process(self, table: pa.Table) -> pa.Table:
        captions = table.column("caption").to_pylist()
        hashes = [None if c is None else int.from_bytes(hashlib.sha256(c.encode()).digest()[:8], "little", signed=True) for c in captions]
        return set_column(table, "_caption_hash", pa.array(hashes, pa.int64()))

    def group_rows(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(np.asarray(pc.is_valid(table.column("_caption_hash"))))
        return rows, table.column("_caption_hash").take(rows).to_numpy()

    def verify(self, left: pa.Table, right: pa.Table) -> pa.Array:
        while self.config.hold and os.path.exists(self.config.hold):
            time.sleep(0.05)
        return super().verify(left, right)


def register(monkeypatch) -> None:
    """Register the toy stages for in-process runs."""
    from mmcurate.pipelines import registry

    for name, target in TOY_STAGES.items():
        monkeypatch.setitem(registry.STAGES, name, target)


# ---------------------------------------------------------------------------------------------
# Running the CLI


def mmcurate_exe() -> str:
    exe = shutil.which("mmcurate") or str(Path(sys.executable).parent / "mmcurate")
    assert Path(exe).exists(), "the mmcurate console command is not installed"
    return exe


def run_cli(*args: str, cwd: Path | str | None = None, toy: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``mmcurate`` console command (or, with ``toy``, the same CLI with the toy stages)."""
    cmd = toy_cli_command(*args) if toy else [mmcurate_exe(), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def toy_stage(stage: str, src: Path | str, out: Path | str, *extra: str, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """``mmcurate stage STAGE --input SRC --output OUT --workers 1 --no-progress EXTRA`` with the toy stages registered."""
    return run_cli("stage", stage, "--input", str(src), "--output", str(out), "--workers", "1", "--no-progress", *extra, cwd=cwd, toy=True)


def toy_cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", MODULE, *args]


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2 with one clear line on stderr that names each fragment, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmcurate: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Reading an output folder


def read_folder(folder: Path) -> pa.Table:
    """All Parquet files of ``folder`` concatenated in shard order (empty table if none)."""
    files = sorted(folder.glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def kept_table(out: Path) -> pa.Table:
    """Kept rows of an output: ``meta/`` for WebDataset output, else ``shards/*.parquet``."""
    return read_folder(out / "meta") if (out / "meta").exists() else read_folder(out / "shards")


def check_accounting(out: Path) -> dict:
    """Rows in = kept + rejected, for every shard (files and ``_stats``) and for the run; return totals."""
    totals = {"rows_in": 0, "kept": 0, "rejected": 0}
    kept_dir = out / "meta" if (out / "meta").exists() else out / "shards"
    ids = sorted(p.name for p in (out / "_done").iterdir())
    assert ids == sorted(p.stem for p in (out / "_stats").glob("*.json"))
    for shard in ids:
        stats = json.loads((out / "_stats" / f"{shard}.json").read_text())
        kept = pq.read_metadata(kept_dir / f"{shard}.parquet").num_rows
        rejected = pq.read_metadata(out / "rejects" / f"{shard}.parquet").num_rows
        assert stats["rows_in"] == stats["kept"] + stats["rejected"], stats
        assert (stats["kept"], stats["rejected"]) == (kept, rejected), (shard, stats, kept, rejected)
        assert stats["rejected"] == sum(s["rejected"] for s in stats["stages"])
        for entry in stats["stages"]:
            assert entry["rejected"] == sum(entry["reasons"].values()), entry
        for key in totals:
            totals[key] += stats[key]
    run = json.loads((out / "run.json").read_text())
    assert run["finished"] is not None
    assert run["totals"] == totals
    return totals


def key_of(rel: str, row: int) -> str:
    """The documented key recipe, written out independently of the reader."""
    return hashlib.sha256(rel.encode() + b"\0" + str(row).encode()).hexdigest()[:16]


def tables_equal(a: pa.Table, b: pa.Table) -> bool:
    return a.schema.remove_metadata().equals(b.schema.remove_metadata()) and a.equals(b)


def stats_without_seconds(path: Path) -> dict:
    data = json.loads(path.read_text())
    for entry in data["stages"]:
        entry.pop("seconds")
    return data


def sorted_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def assert_same_output(a: Path, b: Path) -> None:
    """Two outputs equal file by file: shards, meta and rejects byte-identical, stats but for seconds,
    done markers naming the same files (their run ids differ)."""
    files = sorted_files(a)
    assert files == sorted_files(b)
    for name in files:
        if name.startswith("_stats/"):
            assert stats_without_seconds(a / name) == stats_without_seconds(b / name), name
        elif name.startswith("_done/"):
            assert sorted(json.loads((a / name).read_text())["files"]) == sorted(json.loads((b / name).read_text())["files"]), name
        elif name == "run.json":
            ra, rb = (json.loads((p / name).read_text()) for p in (a, b))
            assert ra["totals"] == rb["totals"] and ra["pipeline"]["stages"] == rb["pipeline"]["stages"]
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


if __name__ == "__main__":
    from mmcurate.cli import main
    from mmcurate.pipelines import registry

    registry.STAGES.update(TOY_STAGES)
    sys.exit(main())


def laion_csv_with_repeats(laion_sample: Path, path: Path, rows: int) -> Path:
    """The first ``rows`` LAION rows as a CSV (URL, TEXT) at ``path``, every 7th caption repeating the one before."""
    records = pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, rows).to_pylist()
    for i in range(7, len(records), 7):
        records[i]["TEXT"] = records[i - 1]["TEXT"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["URL", "TEXT"])
        writer.writeheader()
        writer.writerows(records)
    return path


def hold(path: str, fs=None, **fields) -> None:
    """Write a lease file on the output ``path`` as another run would, this host's live parent process by default."""
    record = {"token": "other", "owner": "alice", "host": socket.gethostname(), "pid": os.getppid(), "heartbeat": time.time(), **fields}
    (fs or fsspec.filesystem("file")).pipe_file(f"{path}/{LEASE}", json.dumps(record).encode())
