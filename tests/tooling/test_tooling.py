"""inspect, validate, stats and schema docs through the real console command."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmcurate import schemas

REPO = Path(__file__).resolve().parents[2]


def mmcurate(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mmcurate"
    return subprocess.run([str(exe), *args], check=False, capture_output=True, text=True, timeout=300)


def test_schema_doc_is_generated_from_the_schema():
    assert (REPO / "docs" / "schema.md").read_text() == schemas.markdown()


def test_inspect_img2dataset_reports_tar_samples_and_rows_by_status(img2dataset_output):
    result = mmcurate("inspect", str(img2dataset_output))
    assert result.returncode == 0, result.stderr
    assert "img2dataset dataset" in result.stdout
    assert "tar samples: 10 in 2 tars" in result.stdout
    assert "success 10" in result.stdout and "failed_to_download 2" in result.stdout


def test_validate_img2dataset_output_and_a_tar_missing_an_image(img2dataset_output, tmp_path):
    assert mmcurate("validate", str(img2dataset_output)).returncode == 0
    broken = tmp_path / "i2d"
    shutil.copytree(img2dataset_output, broken)
    with tarfile.open(broken / "00000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "000000000.jpg"]
    with tarfile.open(broken / "00000.tar", "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    result = mmcurate("validate", str(broken))
    assert result.returncode == 1
    assert "key 000000000: status success" in result.stdout


def _run(img2dataset_output: Path, out: Path, fmt: str) -> None:
    pipeline = out.parent / f"{out.name}.yaml"
    pipeline.write_text(
        json.dumps(
            {
                "input": {"path": str(img2dataset_output)},
                "output": {"path": str(out), "format": fmt, "rows_per_shard": 4},
                "workers": 1,
                "stages": [],
            }
        )
    )
    result = mmcurate("run", str(pipeline), "--no-progress")
    assert result.returncode == 0, result.stderr


def test_inspect_validate_stats_on_mmcurate_output(img2dataset_output, tmp_path):
    out = tmp_path / "out"
    _run(img2dataset_output, out, "webdataset")
    assert mmcurate("validate", str(out)).stdout.strip() == "valid"
    inspected = mmcurate("inspect", str(out)).stdout
    assert "kept: 10 rows" in inspected and "rejected: 2 rows" in inspected and "read/not_downloaded: 2" in inspected
    stats = json.loads(mmcurate("stats", str(out), "--json").stdout)
    assert (stats["rows_in"], stats["kept"], stats["rejected"]) == (12, 10, 2)
    assert stats["stages"]["read"]["reasons"] == {"not_downloaded": 2}
    plot = tmp_path / "funnel.png"
    assert mmcurate("stats", str(out), "--plot", str(plot)).returncode == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_reports_file_row_and_field(img2dataset_output, tmp_path):
    out = tmp_path / "out"
    _run(img2dataset_output, out, "parquet")
    shard = out / "shards" / "00000.parquet"
    table = pq.read_table(shard)
    keys = table.column("key").to_pylist()
    keys[1] = "has.dot"
    table = table.set_column(0, "key", pa.array(keys)).replace_schema_metadata(None)
    pq.write_table(table, shard)
    result = mmcurate("validate", str(out))
    assert result.returncode == 1
    assert f"{shard}: row 1, field key: 'has.dot' contains a dot" in result.stdout
    assert "no schema_version" in result.stdout


def test_validate_catches_tar_and_meta_disagreeing(img2dataset_output, tmp_path):
    out = tmp_path / "out"
    _run(img2dataset_output, out, "webdataset")
    tar_path = out / "shards" / "00000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith(".txt")]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    result = mmcurate("validate", str(out))
    assert result.returncode == 1
    assert "no .txt member" in result.stdout


def test_usage_errors_are_one_line(tmp_path):
    result = mmcurate("inspect", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    result = mmcurate("stats", str(tmp_path))
    assert result.returncode == 2 and "not an mmcurate output" in result.stderr


def test_stage_reference_is_generated_from_the_stage_classes():
    from mmcurate.pipelines.reference import markdown

    assert (REPO / "docs" / "stages.md").read_text() == markdown()
    listing = mmcurate("stages").stdout
    assert listing.count("\n") == len(__import__("mmcurate.pipelines.registry", fromlist=["STAGES"]).STAGES)
