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


def _listening(pid: int) -> set[str]:
    """The local ADDRESS:PORT (hex, as /proc/net writes them) of the TCP sockets process ``pid`` listens on."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")} - {""}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1])
    return found


def test_a_local_session_binds_to_loopback(monkeypatch):
    """Without SPARK_LOCAL_IP, Spark binds its driver and block manager to the host's first non-loopback address."""
    from mmcurate.engines.spark_runner import session

    monkeypatch.setenv("SPARK_LOCAL_IP", "unset")  # restored (or removed) after the test
    monkeypatch.delenv("SPARK_LOCAL_IP")
    spark, started = session(1)
    try:
        jvm = spark.sparkContext._gateway.proc.pid
        addresses = {socket.rsplit(":", 1)[0] for socket in _listening(jvm)}
        sockets = len(_listening(jvm))
    finally:
        spark.stop()
    # 127.0.0.1 in /proc/net/tcp, and as an IPv4-mapped address in tcp6
    assert started and sockets >= 2 and addresses <= {"0100007F", "0000000000000000FFFF00000100007F"}, addresses
