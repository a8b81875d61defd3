"""The spark-submit entry point, run by a real spark-submit on local[2]."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("pyspark")

import mmcurate.jobs.spark_job

pytestmark = pytest.mark.slow


def test_spark_submit_runs_a_pipeline(caption_input, tmp_path, make_pipeline, run_and_read, output_of):
    stages = ["caption_quality", {"minhash_dedup": {"threshold": 0.7}}]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {"input": {"path": str(caption_input)}, "output": {"path": "out", "format": "parquet", "rows_per_shard": 300}, "stages": stages}
        )
    )
    spark_submit = Path(sys.executable).parent / "spark-submit"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    done = subprocess.run(
        [
            str(spark_submit),
            "--master",
            "local[2]",
            "--conf",
            "spark.ui.enabled=false",
            mmcurate.jobs.spark_job.__file__,
            str(pipeline),
            "--set",
            "workers=2",
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows in 3 shards" in done.stdout
    _, local = run_and_read(make_pipeline(caption_input, stages, "local", rows_per_shard=300))
    assert output_of(str(tmp_path / "out")) == local
    assert yaml.safe_load((tmp_path / "out" / "run.json").read_text())["engine"] == "spark"
