"""Fewer shards than workers: the local engine spreads a shard's downloads over processes, same files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import Executor, Future
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate import killpoints
from mmcurate.engines import local
from mmcurate.stages.base import Stage, set_column
from mmcurate.tests.support.foundation import assert_same_output

PATHS = [
    *["/img/jpeg", "/img/png", "/img/webp", "/img/gif", "/img/cmyk", "/img/rgba", "/img/exif", "/redirect/2"],
    *["/status/404", "/img/html", "/robots/noai", "/loop/a", "/img/truncated", "/img/bomb", "/img/small"],
]


class Count(Stage):
    """Adds the row's number in the piece it was processed in; counts its calls as events."""

    name = "count"
    split_rows = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def process(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        return set_column(batch, "n", pa.array(range(batch.num_rows), pa.int64()))

    def events(self) -> dict[str, int]:
        calls, self.calls = self.calls, 0
        return {"calls": calls}


class Whole(Count):
    split_rows = False


class Inline(Executor):
    """Runs what is submitted at once, and keeps the arguments."""

    def __init__(self) -> None:
        self.submitted: list[tuple] = []

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self.submitted.append(args)
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def test_split_rows_cuts_consecutive_pieces_and_joins_them_in_order(monkeypatch, tmp_path: Path) -> None:
    pool, stage = Inline(), Count()
    monkeypatch.setattr(local, "_CONTEXT", SimpleNamespace(ready=lambda position: stage))
    kept = pa.table({"key": [f"k{i}" for i in range(10)]})
    processed, events = local.split_rows(pool, 3, str(tmp_path))(stage, 4, kept)
    assert [(position, piece.column("key").to_pylist()) for position, piece, _ in pool.submitted] == [
        (4, ["k0", "k1", "k2", "k3"]),
        (4, ["k4", "k5", "k6", "k7"]),
    ]
    assert processed.column("key").equals(kept.column("key"))
    assert processed.column("n").to_pylist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert events == {"calls": 3} and not list(tmp_path.iterdir())  # the pool's pieces came back as files, removed once mapped
    # a stage that does not split rows, or fewer rows than pieces: in this process, in one piece
    for other, rows in ((Whole(), kept), (Count(), kept.slice(0, 2))):
        processed, events = local.split_rows(pool, 3, str(tmp_path))(other, 4, rows)
        assert processed.column("n").to_pylist() == list(range(rows.num_rows)) and events == {"calls": 1}
    assert len(pool.submitted) == 2


def test_shards_are_split_when_whole_shards_would_leave_a_worker_idle() -> None:
    stages = [Whole(), Count()]
    assert [n for n in range(1, 9) if local.splits_shards(n, 2, stages)] == [1, 3]
    assert [n for n in range(1, 9) if local.splits_shards(n, 3, stages)] == [1, 2, 4, 5]
    assert not local.splits_shards(1, 1, stages) and not local.splits_shards(1, 2, [Whole()])


def _run(tmp_path: Path, server, name: str, workers: int, kill_at: str | None = None, shard: int = 20) -> subprocess.CompletedProcess:
    urls = tmp_path / "urls.parquet"
    if not urls.exists():
        rows = [server.url(p) for p in PATHS * 2] + ["ftp://127.0.0.1/x.jpg"]
        pq.write_table(pa.table({"url": rows, "caption": [f"caption {i}" for i in range(len(rows))]}), urls)
    pipeline = tmp_path / f"{name}.yaml"
    pipeline.write_text(
        f"input: {{path: urls.parquet}}\noutput: {{path: {name}, format: webdataset, rows_per_shard: {shard}}}\nworkers: {workers}\n"
        "stages:\n  - download: {image_size: 64, retries: 0, allow_private_networks: true}\n"
    )
    env = {**os.environ, killpoints.ENV: kill_at} if kill_at else None
    command = [sys.executable, "-m", "mmcurate.cli", "run", str(pipeline), "--no-progress"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
def test_a_download_spread_over_workers_writes_the_files_of_one_worker_and_resumes(server, tmp_path: Path) -> None:
    """Two shards on 3 workers (each shard's rows in 3 pieces, 2 in pool processes) give the files of
    1 worker; so does a run killed after the first shard's download, or after the second's, and resumed."""
    assert _run(tmp_path, server, "one", 1).returncode == 0
    done = _run(tmp_path, server, "three", 3)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "one" / "shards").glob("*.tar"))) == 2
    assert_same_output(tmp_path / "three", tmp_path / "one")
    for point in ("stage:1", "stage:2"):
        name = f"killed-{point.replace(':', '')}"
        assert _run(tmp_path, server, name, 3, point).returncode == -signal.SIGKILL
        resumed = _run(tmp_path, server, name, 3)
        assert resumed.returncode == 0, resumed.stderr
        assert_same_output(tmp_path / name, tmp_path / "one")
    # 3 shards on 2 workers: split too, the files still those of 1 worker
    assert _run(tmp_path, server, "one-3", 1, shard=11).returncode == 0
    assert _run(tmp_path, server, "two-3", 2, shard=11).returncode == 0
    assert len(list((tmp_path / "one-3" / "shards").glob("*.tar"))) == 3
    assert_same_output(tmp_path / "two-3", tmp_path / "one-3")
