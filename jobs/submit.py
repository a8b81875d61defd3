"""Submit a pipeline to a Ray cluster through the Ray Jobs API, and follow or stop the job.

The resolved pipeline (``--set`` overrides applied, relative paths made absolute) is written to a
fresh folder uploaded as the job's ``working_dir``; the job runs ``python -m mmcurate.jobs.ray_job
pipeline.yaml`` there. Input and output paths must be reachable from the cluster (shared storage
or object stores such as ``s3://``); mmcurate must be installed on the cluster's nodes, or listed
in ``pip`` to be installed by Ray for the job.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from mmcurate.errors import UsageError
from mmcurate.pipelines.config import Pipeline

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at ``address`` (default: ``RAY_ADDRESS``)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot reach the Ray dashboard at {address or '$RAY_ADDRESS'}: {str(e).splitlines()[0]}") from None


def submit(pipeline: Pipeline, address: str | None, pip: list[str], job_id: str | None = None) -> str:
    """Submit ``pipeline`` as a Ray job; return its job id."""
    config = pipeline.as_dict()
    config["engine"] = "ray"
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="mmcurate-job-") as folder:
        (Path(folder) / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        runtime_env: dict = {"working_dir": folder}
        if pip:
            runtime_env["pip"] = list(pip)
        # The working_dir is packed and uploaded here, before submit_job returns.
        return jobs.submit_job(
            entrypoint="python -m mmcurate.jobs.ray_job pipeline.yaml",
            runtime_env=runtime_env,
            submission_id=job_id,
            metadata={"tool": "mmcurate", "output": pipeline.output.path},
        )


def status(address: str | None, job_id: str) -> str:
    return str(_ask(address, job_id, "get_job_status").value)


def logs(address: str | None, job_id: str) -> str:
    return _ask(address, job_id, "get_job_logs")


def stop(address: str | None, job_id: str) -> bool:
    """Ask the job to stop; whether it was still running."""
    return _ask(address, job_id, "stop_job")


def _ask(address: str | None, job_id: str, method: str):
    try:
        return getattr(client(address), method)(job_id)
    except RuntimeError as e:  # the client's answer to an unknown job id
        raise UsageError(f"job {job_id}: {str(e).splitlines()[0]}") from None


def wait(address: str | None, job_id: str, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Poll until the job ends; its final status."""
    jobs = client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (state := str(jobs.get_job_status(job_id).value)) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout_s} s")
        time.sleep(poll_s)
    return state


def command(args, pipeline: Pipeline | None) -> int:
    """``mmcurate submit`` (with ``pipeline``) and ``mmcurate jobs status|logs|stop``."""
    if pipeline is not None:
        job_id = submit(pipeline, args.address, args.pip, args.job_id)
        print(f"submitted {job_id}")
        if not args.wait:
            return 0
        state = wait(args.address, job_id)
        print(logs(args.address, job_id), end="")
        print(f"{job_id} {state}")
        return 0 if state == "SUCCEEDED" else 1
    if args.action == "status":
        print(status(args.address, args.job_id))
    elif args.action == "logs":
        print(logs(args.address, args.job_id), end="")
    else:
        print("stopping" if stop(args.address, args.job_id) else "not running")
    return 0
