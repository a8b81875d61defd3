"""`mmcurate submit` / `mmcurate jobs` against a real Ray head started for this module."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from mmcurate.cli import main

pytestmark = pytest.mark.slow

STAGES = ["caption_quality", {"minhash_dedup": {"threshold": 0.7}}]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open until every one is chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the dashboard (Jobs API) on free ports, in its own session so that only
    its processes are stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="mmray", dir="/tmp")
    names = (
        "port",
        "dashboard-port",
        "ray-client-server-port",
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    worker_base = random.randrange(20000, 30000, 100)  # below Linux's ephemeral range, where the ports above come from
    ports |= {"min-worker-port": worker_base, "max-worker-port": worker_base + 99}
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAY_AUTH_MODE"] = "disabled"  # a throw-away head on 127.0.0.1: no token to hand around
    cmd = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--object-store-memory={200 * 2**20}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]
    log = open(Path(temp) / "head.log", "wb")  # noqa: SIM115
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for_jobs_api(address, head, Path(temp) / "head.log")
        yield address
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (``ray start --block`` and everything it started)."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
            head.wait(wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_jobs_api(address: str, head: subprocess.Popen, log: Path) -> None:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}: {log.read_text()[-2000:]}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except AuthenticationError:
            raise
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_submit_runs_the_pipeline_as_a_ray_job(ray_head, caption_input, tmp_path, capsys, run_and_read, make_pipeline, output_of):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {"input": {"path": str(caption_input)}, "output": {"path": "out", "format": "parquet", "rows_per_shard": 300}, "stages": STAGES}
        )
    )
    assert main(["submit", str(pipeline), "--address", ray_head, "--job-id", "mmcurate-test-job", "--wait"]) == 0
    printed = capsys.readouterr().out
    assert "submitted mmcurate-test-job" in printed and "rows in 3 shards" in printed and "SUCCEEDED" in printed

    assert main(["jobs", "status", "mmcurate-test-job", "--address", ray_head]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert main(["jobs", "logs", "mmcurate-test-job", "--address", ray_head]) == 0
    logged = capsys.readouterr().out  # where the job is: the global step and the stages of each segment
    assert "global step minhash_dedup: deciding over " in logged and "  caption_quality: " in logged and " rows in, " in logged
    assert main(["jobs", "stop", "mmcurate-test-job", "--address", ray_head]) == 0
    assert capsys.readouterr().out.strip() == "not running"
    assert main(["jobs", "logs", "no-such-job", "--address", ray_head]) == 2

    _, local = run_and_read(make_pipeline(caption_input, STAGES, "local", rows_per_shard=300))
    assert output_of(str(tmp_path / "out")) == local
    assert yaml.safe_load((tmp_path / "out" / "run.json").read_text())["engine"] == "ray"
