"""`mmcurate submit` / `mmcurate jobs` and `run --engine ray` on a head node, against real Ray heads
(``ray start --head`` on 127.0.0.1) started for this module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from mmcurate.cli import main
from mmcurate.tests.support.ray_head import ray_head

pytestmark = pytest.mark.slow

STAGES = ["caption_quality", {"minhash_dedup": {"threshold": 0.7}}]
BARE_PATH = "/usr/bin:/bin"  # as on a head whose Ray runs from a virtualenv that is not on PATH


@pytest.fixture(scope="module")
def head():
    """A head whose PATH does not lead to this interpreter: jobs run only with ``--python``."""
    with ray_head({"PATH": BARE_PATH}) as started:
        yield started


def _pipeline(tmp_path: Path, caption_input: Path, stages=STAGES, output: str = "out") -> Path:
    path = tmp_path / "pipeline.yaml"
    output_config = {"path": output, "format": "parquet", "rows_per_shard": 300}
    path.write_text(yaml.safe_dump({"input": {"path": str(caption_input)}, "output": output_config, "stages": stages}))
    return path


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``mmcurate ARGS`` in a fresh process (its own Ray client state: auth mode, token cache)."""
    code = "import sys; from mmcurate.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _client_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **extra}


def test_submit_runs_the_pipeline_as_a_ray_job(head, caption_input, tmp_path, capsys, run_and_read, make_pipeline, output_of):
    pipeline = _pipeline(tmp_path, caption_input)
    job = ["--address", head.address]
    assert main(["submit", str(pipeline), *job, "--python", sys.executable, "--job-id", "mmcurate-test-job", "--wait"]) == 0
    printed = capsys.readouterr().out
    assert "submitted mmcurate-test-job" in printed and "rows in 3 shards" in printed and "mmcurate-test-job SUCCEEDED" in printed
    # the log came as the job ran: the per-stage progress lines are in what --wait printed
    assert "global step minhash_dedup: deciding over " in printed and "  caption_quality: " in printed

    assert main(["jobs", "status", "mmcurate-test-job", *job]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    for follow in ([], ["--follow"]):
        assert main(["jobs", "logs", "mmcurate-test-job", *job, *follow]) == 0
        logged = capsys.readouterr().out  # where the job is: the global step and the stages of each segment
        assert "global step minhash_dedup: deciding over " in logged and "  caption_quality: " in logged and " rows in, " in logged
        # Ray's noise: the actor-restart warning of every Ray Data actor pool, the advice to reserve more memory per worker
        assert "max_restarts" not in logged and "memory=" not in logged
    assert main(["jobs", "stop", "mmcurate-test-job", *job]) == 0
    assert capsys.readouterr().out.strip() == "not running"

    _, local = run_and_read(make_pipeline(caption_input, STAGES, "local", rows_per_shard=300))
    assert output_of(str(tmp_path / "out")) == local
    assert yaml.safe_load((tmp_path / "out" / "run.json").read_text())["engine"] == "ray"

    # the same --job-id again: one line before anything is uploaded
    assert main(["submit", str(pipeline), *job, "--job-id", "mmcurate-test-job"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "job mmcurate-test-job exists on the cluster (SUCCEEDED)" in err


def test_job_errors_are_one_line(head, caption_input, tmp_path, capsys):
    job = ["--address", head.address]
    for args in (["jobs", "logs", "no-such-job", *job], ["jobs", "status", "no-such-job", *job], ["jobs", "stop", "no-such-job", *job]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Job no-such-job does not exist" in err
    # a job whose pipeline fails on the cluster: the status says why
    failing = _pipeline(tmp_path, caption_input, stages=["exact_dedup"])
    assert main(["submit", str(failing), *job, "--python", sys.executable, "--job-id", "mmcurate-failing", "--wait"]) == 1
    assert "mmcurate-failing FAILED: " in capsys.readouterr().out
    assert main(["jobs", "status", "mmcurate-failing", *job]) == 0
    reason = capsys.readouterr().out.strip()
    assert reason.startswith("FAILED: Job entrypoint command failed with exit code 2: mmcurate: error: stage exact_dedup needs column")


def test_ctrl_c_on_wait_leaves_the_job_running(head, caption_input, tmp_path):
    pipeline = _pipeline(tmp_path, caption_input)
    code = "import sys; from mmcurate.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["submit", str(pipeline), "--address", head.address, "--python", sys.executable, "--job-id", "mmcurate-interrupted", "--wait"]
    waiting = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert waiting.stdout.readline().strip() == "submitted mmcurate-interrupted"
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 130
    assert "job mmcurate-interrupted goes on running on the cluster" in err and "Traceback" not in err
    assert f"mmcurate jobs stop mmcurate-interrupted --address {head.address}" in err
    assert f"mmcurate jobs logs mmcurate-interrupted --follow --address {head.address}" in err

    stopping = _cli("jobs", "stop", "mmcurate-interrupted", "--address", head.address, env=_client_env())
    assert stopping.stdout.strip() == "stopping"  # it was still running
    for _ in range(60):
        status = _cli("jobs", "status", "mmcurate-interrupted", "--address", head.address, env=_client_env()).stdout
        if status.startswith("STOPPED"):
            break
        time.sleep(1)
    assert status.startswith("STOPPED")


def test_run_on_a_head_node_joins_its_cluster(head, caption_input, tmp_path):
    """`mmcurate run --engine ray` on the head without RAY_ADDRESS: the cluster started there, not a second Ray."""
    pipeline = _pipeline(tmp_path, caption_input, output=str(tmp_path / "out"))
    on_head = _client_env(RAY_TMPDIR=str(head.temp), RAY_AUTH_MODE="disabled")  # as the head (Ray turns token auth on for a token file)
    done = _cli("run", str(pipeline), "--engine", "ray", "--workers", "1", env=on_head, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in done.stderr and "rows in 3 shards" in done.stdout


def test_token_auth(tmp_path, caption_input):
    """A head with token authentication: the token where Ray keeps it is sent without RAY_AUTH_MODE;
    no token or another one is one line, exit 2."""
    token = "0123456789abcdef0123456789abcdef"
    homes = {}
    for name, value in (("right", token), ("wrong", "f" * 32), ("none", None)):
        homes[name] = tmp_path / name
        (homes[name] / ".ray").mkdir(parents=True)
        if value:
            (homes[name] / ".ray" / "auth_token").write_text(value)
    with ray_head({"RAY_AUTH_MODE": "token", "HOME": str(homes["right"])}) as secured:
        ask = ("jobs", "status", "no-such-job", "--address", secured.address)
        asked = {name: _cli(*ask, env=_client_env(HOME=str(home))) for name, home in homes.items()}
    for done in asked.values():
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "Job no-such-job does not exist" in asked["right"].stderr  # past the token check
    assert "refused this client: the token here is not the cluster's" in asked["wrong"].stderr
    assert "refused this client: it wants a token" in asked["none"].stderr


def test_unreachable_dashboard_is_one_line(tmp_path):
    from mmcurate.tests.support.ray_head import free_ports

    done = _cli("jobs", "status", "some-job", "--address", f"http://127.0.0.1:{free_ports(1)[0]}", env=_client_env())
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "cannot reach the Ray dashboard at http://127.0.0.1:" in done.stderr


def test_address_flag_wins_over_ray_address(head):
    """Ray's client takes RAY_ADDRESS over its address argument; mmcurate's --address wins."""
    from mmcurate.tests.support.ray_head import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    done = _cli("jobs", "status", "no-such-job", "--address", head.address, env=_client_env(RAY_ADDRESS=dead))
    assert done.returncode == 2 and "Job no-such-job does not exist" in done.stderr, done.stderr  # the head answered
    done = _cli("jobs", "status", "no-such-job", "--address", dead, env=_client_env(RAY_ADDRESS=head.address))
    assert done.returncode == 2 and f"cannot reach the Ray dashboard at {dead}" in done.stderr, done.stderr
