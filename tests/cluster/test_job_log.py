"""A job's log (stderr no terminal, so no bar) shows a segment's progress as it goes: rows and shards done,
kept and rejected so far, at most every LOG_EVERY_S seconds; then the per-stage lines."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from mmcurate.cli import main
from mmcurate.engines import progress
from mmcurate.tests.support.foundation import LAION, register


def test_a_log_shows_progress_lines(tmp_path: Path, laion_sample: Path, capsys, monkeypatch) -> None:
    src = tmp_path / "urls.parquet"
    pq.write_table(pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, 20), src)
    register(monkeypatch)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    args = ["stage", "drop_word", "--input", str(src), "--output", str(tmp_path / "out"), "--rows-per-shard", "10", "--workers", "1"]
    assert main([*args, *LAION]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shards: ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("shards: 10/20 rows done (1 shards), ") and lines[1].startswith("shards: 20/20 rows done (2 shards), ")
    kept, rejected = (int(part.split()[0]) for part in lines[1].split(", ")[1:])
    assert kept + rejected == 20


def test_no_lines_without_progress(tmp_path: Path, laion_sample: Path, capsys, monkeypatch) -> None:
    src = tmp_path / "urls.parquet"
    pq.write_table(pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, 20), src)
    register(monkeypatch)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    args = ["stage", "drop_word", "--input", str(src), "--output", str(tmp_path / "out"), "--rows-per-shard", "10", "--workers", "1"]
    assert main([*args, *LAION, "--no-progress"]) == 0
    assert "rows done" not in capsys.readouterr().err
