"""``mmcurate diff``: two runs of one pipeline agree; planted differences are reported, within a float tolerance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.cli import main
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.writers import WebDatasetWriter, tar_bytes


def run(tmp_path: Path, src: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["stage", "caption_quality", "--input", str(src), "--output", str(out), "--no-progress", *extra]) == 0
    return out


def diff(capsys, a: Path, b: Path, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["diff", str(a), str(b), *extra])
    return code, capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def captions(tmp_path_factory, laion_sample: Path) -> Path:
    """The LAION sample with a float column, ``score``, which the output carries."""
    table = pq.read_table(laion_sample)
    path = tmp_path_factory.mktemp("captions") / "captions.parquet"
    pq.write_table(table.append_column("score", pa.array([i / 7 for i in range(table.num_rows)])), path)
    return path


def edit(path: Path, column: str, row: int, change) -> None:
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = change(values[row])
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type)), path)


def test_two_runs_of_one_pipeline_agree_and_planted_differences_are_reported(tmp_path: Path, captions: Path, capsys) -> None:
    options = ("--url-col", "URL", "--caption-col", "TEXT", "--rows-per-shard", "400")
    a = run(tmp_path, captions, "a", *options, "--workers", "1")
    b = run(tmp_path, captions, "b", *options, "--workers", "2")
    record = json.loads((b / "run.json").read_text())
    record.update(engine="ray", started="2000-01-01T00:00:00+00:00")
    (b / "run.json").write_text(json.dumps(record))
    stats = json.loads((b / "_stats" / "00001.json").read_text())
    stats["stages"][1]["seconds"] = 99.0
    (b / "_stats" / "00001.json").write_text(json.dumps(stats))
    assert diff(capsys, a, b) == (0, [f"{a} and {b} agree"])

    planted = tmp_path / "planted"
    shutil.copytree(b, planted)
    kept = planted / "shards" / "00001.parquet"
    key = pq.read_table(kept).column("key")[3].as_py()
    edit(kept, "caption", 3, lambda c: c + " planted")
    edit(kept, "score", 4, lambda s: s * (1 + 1e-9))  # within the tolerance
    edit(planted / "rejects" / "00000.parquet", "reject_reason", 0, lambda r: "caption_too_short")
    table = pq.read_table(planted / "shards" / "00002.parquet")
    pq.write_table(table.slice(1), planted / "shards" / "00002.parquet")
    code, lines = diff(capsys, a, planted)
    assert code == 1 and lines[-1] == f"{a} and {planted} differ"
    assert any(line.startswith("kept values differ in caption: 1 (e.g. " + key) and "planted'" in line for line in lines)
    assert any(line.startswith("rejected values differ in reject_reason: 1") for line in lines)
    assert any(line.startswith("rejects by stage and reason differ: 2") and "caption_too_short: 0 in A, 1 in B" in line for line in lines)
    assert f"rows only in A: 1 (e.g. {table.column('key')[0].as_py()})" in lines
    assert not any("score" in line for line in lines)

    edit(kept, "score", 5, lambda s: s + 1e-3)
    code, lines = diff(capsys, a, planted, "--tolerance", "1e-2")
    assert not any("score" in line for line in lines)
    code, lines = diff(capsys, a, planted)
    assert any(line.startswith("kept values differ in score: 1") for line in lines)


def test_options_and_formats_that_differ_are_reported(tmp_path: Path, captions: Path, capsys) -> None:
    options = ("--url-col", "URL", "--caption-col", "TEXT")
    a = run(tmp_path, captions, "a", *options)
    b = run(tmp_path, captions, "b", *options, "--output-format", "webdataset", "--set", "caption_quality.min_words=3")
    code, lines = diff(capsys, a, b)
    assert code == 1
    assert "run.json pipeline.output.format: None != 'webdataset'" in lines
    assert any(line.startswith("run.json pipeline.stages[0].caption_quality.min_words: '(absent)' != ") for line in lines)
    assert any(line.startswith("kept in A, rejected in B: ") for line in lines)


def test_webdataset_outputs_compare_their_images(tmp_path: Path, img2dataset_output: Path, capsys) -> None:
    a = run(tmp_path, img2dataset_output, "a", "--workers", "1")
    b = run(tmp_path, img2dataset_output, "b", "--workers", "1")
    assert diff(capsys, a, b)[0] == 0
    rows = WebDatasetWriter().read(OutputDir.open(str(b)), 0)
    images = rows.column("image").to_pylist()
    images[0] = images[1]  # the first sample's image replaced by the second's, everything else equal
    (b / "shards" / "00000.tar").write_bytes(
        tar_bytes(rows.set_column(rows.column_names.index("image"), "image", pa.array(images, pa.binary())))
    )
    code, lines = diff(capsys, a, b)
    assert code == 1 and any(line.startswith(f"kept values differ in image: 1 (e.g. {rows.column('key')[0].as_py()}: <") for line in lines)


def test_a_folder_that_is_not_an_output_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["diff", str(tmp_path), str(tmp_path)]) == 2
    assert "is not an mmcurate output" in capsys.readouterr().err
