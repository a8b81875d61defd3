"""The console command: exit codes, fsspec URLs, schema printing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmcurate import __version__, schemas
from mmcurate.tests.support.foundation import LAION, check_accounting, kept_table, run_cli, toy_stage, write_yaml


def test_exit_0_when_the_run_finishes_with_rejections(tmp_path: Path, laion_sample: Path) -> None:
    result = toy_stage("drop_word", laion_sample, tmp_path / "out", *LAION, "--set", "word=e")
    assert result.returncode == 0, result.stderr
    totals = check_accounting(tmp_path / "out")
    assert totals["rejected"] > 900
    assert f"1000 rows in 1 shards: {totals['kept']} kept, {totals['rejected']} rejected" in result.stdout
    # The summary table: per stage rows in, rejected, rows left, seconds, rows/s and reasons.
    row = next(line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["drop_word"])
    assert row[1:4] == ["1000", str(totals["rejected"]), str(totals["kept"])] and row[-2:] == ["has_word", str(totals["rejected"])]


def test_exit_1_when_the_run_itself_fails(tmp_path: Path, url_rows: list[dict]) -> None:
    """A stage that crashes: exit 1 with the traceback and a resume hint; finished shards stay done."""
    rows = [{**r, "TEXT": "boom" if i == 25 else r["TEXT"]} for i, r in enumerate(url_rows)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    result = toy_stage("boom", tmp_path / "urls.parquet", tmp_path / "out", *LAION, "--rows-per-shard", "10")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr
    assert result.stderr.rstrip().endswith("mmcurate: the run failed; finished shards are kept and a re-run resumes")
    assert sorted(p.name for p in (tmp_path / "out" / "_done").iterdir()) == ["00000", "00001"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["finished"] is None


def test_exit_2_on_command_line_mistakes(tmp_path: Path) -> None:
    for args in (["stage", "drop_word"], ["frobnicate"], ["stage", "x", "--input", "a", "--output", "b", "--output-format", "zip"], []):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and "error:" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_submit_refuses_the_flags_a_job_would_ignore(tmp_path: Path, capsys) -> None:
    """--engine, --workers, --retry-failed and --no-progress mean nothing to a Ray job: one line, exit 2, before any cluster is asked."""
    from mmcurate.cli import main

    for flag in (["--engine", "local"], ["--workers", "4"], ["--retry-failed"], ["--no-progress"]):
        assert main(["submit", "laion", "--address", "http://127.0.0.1:9", *flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mmcurate: error: submit does not take {flag[0]}:") and err.count("\n") == 1


def test_version_and_schema(tmp_path: Path) -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"mmcurate {__version__}"
    markdown = run_cli("schema", "--markdown")
    assert markdown.returncode == 0 and markdown.stdout == schemas.markdown()
    plain = run_cli("schema")
    assert plain.returncode == 0
    assert [line.split(":")[0] for line in plain.stdout.splitlines() if not line.startswith(" ")] == [f.name for f in schemas.FIELDS]


def test_file_urls_for_input_and_output(tmp_path: Path, laion_sample: Path, img2dataset_output: Path) -> None:
    """fsspec ``file://`` URLs work for input and output, on the command line and in a pipeline YAML."""
    out_url = (tmp_path / "via_flags").as_uri()
    result = toy_stage("drop_word", laion_sample.as_uri(), out_url, *LAION, "--rows-per-shard", "600")
    assert result.returncode == 0, result.stderr
    assert check_accounting(tmp_path / "via_flags")["rows_in"] == 1000
    assert json.loads((tmp_path / "via_flags" / "run.json").read_text())["pipeline"]["output"]["path"] == out_url

    pipeline = write_yaml(
        tmp_path / "p.yaml",
        {
            "input": {"path": img2dataset_output.as_uri()},
            "output": {"path": (tmp_path / "via_yaml").as_uri(), "format": "parquet"},
            "workers": 1,
            "stages": [],
        },
    )
    result = run_cli("run", str(pipeline), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    kept = kept_table(tmp_path / "via_yaml")
    assert kept.num_rows == 10 and kept.column("image").null_count == 0
    # A run chained on a file:// output.
    chained = ("--input", (tmp_path / "via_yaml").as_uri(), "--output", (tmp_path / "chained").as_uri())
    result = run_cli("run", str(pipeline), *chained, "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert kept_table(tmp_path / "chained").equals(kept)
