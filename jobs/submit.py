"""Submit a pipeline to a Ray cluster through the Ray Jobs API, and follow or stop the job.

The resolved pipeline (``--set`` overrides applied, relative paths made absolute) is written to a
fresh folder uploaded as the job's ``working_dir`` (with the files of ``--working-dir``, if given);
the job runs ``PYTHON -m mmcurate.jobs.ray_job PIPELINE`` there, ``PYTHON`` being ``--python`` (default:
``python`` on the head's PATH, or the virtualenv Ray builds for ``--pip``). Input and output paths must
be reachable from the cluster (shared storage or object stores such as ``s3://``).

Every failure to talk to the cluster (unreachable, token refused, unknown job) is one line, exit 2.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from mmcurate.errors import UsageError
from mmcurate.pipelines.config import Pipeline

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PIPELINE_FILE = "mmcurate-pipeline.yaml"
# Flags of `run` that a job would not honour: the cluster's resources size the job, job logs carry
# progress lines (no bar), and --retry-failed is a `run` on the finished output.
IGNORED_FLAGS = {
    "engine": "--engine: a submitted pipeline runs on the Ray cluster",
    "workers": "--workers: the cluster's CPUs set a job's parallelism",
    "retry_failed": "--retry-failed: run `mmcurate run PIPELINE --retry-failed --engine ray` on the cluster",
    "no_progress": "--no-progress: a job logs progress lines, never a bar",
}


@contextmanager
def cluster(address: str | None) -> Iterator:
    """A JobSubmissionClient for the dashboard at ``address`` (default: ``RAY_ADDRESS``); every failure
    to talk to the cluster inside the block becomes one line (UsageError)."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from mmcurate.engines.ray_connect import auth_problem, first_line, use_cluster_token

    where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "$RAY_ADDRESS (unset)"
    use_cluster_token()
    # Ray's client takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over its address argument: --address wins here.
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if address and name in os.environ}
    try:
        yield JobSubmissionClient(address)
    except AuthenticationError as e:
        raise UsageError(auth_problem(where, e)) from None
    except (ConnectionError, requests.RequestException, ValueError) as e:
        raise UsageError(f"cannot reach the Ray dashboard at {where}: {first_line(e)}") from None
    except RuntimeError as e:  # the client's answer to a refused request (unknown job, ...)
        raise UsageError(f"the Ray dashboard at {where} answered: {_answer(e)}") from None
    finally:
        os.environ.update(saved)


def _answer(error: RuntimeError) -> str:
    """The reason in the client's "Request failed with status code N: ..." (often a server traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip().strip(".")]
    last = lines[-1] if lines else ""
    return re.sub(r"^Request failed with status code \d+: ", "", re.sub(r"^\w+(Error|Exception): ", "", last)).rstrip(".")


def submit(
    pipeline: Pipeline,
    address: str | None,
    pip: list[str],
    job_id: str | None = None,
    python: str = "python",
    env: dict[str, str] | None = None,
    working_dir: str | None = None,
) -> str:
    """Submit ``pipeline`` as a Ray job; return its job id."""
    config = pipeline.as_dict()
    config["engine"] = "ray"
    with cluster(address) as jobs, tempfile.TemporaryDirectory(prefix="mmcurate-job-") as temp:
        if job_id is not None and _exists(jobs, job_id):
            raise UsageError(f"job {job_id} exists on the cluster ({jobs.get_job_status(job_id).value}): pick another --job-id")
        folder = Path(temp) / "job"
        if working_dir is not None:
            if not Path(working_dir).is_dir():
                raise UsageError(f"--working-dir {working_dir} is not a folder")
            if (Path(working_dir) / PIPELINE_FILE).exists():
                raise UsageError(f"--working-dir {working_dir} has a {PIPELINE_FILE}, the name of the job's pipeline: rename it")
            shutil.copytree(working_dir, folder, ignore=shutil.ignore_patterns(".git"))
        folder.mkdir(exist_ok=True)
        (folder / PIPELINE_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        runtime_env: dict = {"working_dir": str(folder)}
        if pip:
            runtime_env["pip"] = list(pip)
        if env:
            runtime_env["env_vars"] = dict(env)
        # The working_dir is packed and uploaded here, before submit_job returns.
        return jobs.submit_job(
            entrypoint=f"{shlex.quote(python)} -m mmcurate.jobs.ray_job {PIPELINE_FILE}",
            runtime_env=runtime_env,
            submission_id=job_id,
            metadata={"tool": "mmcurate", "output": pipeline.output.path},
        )


def _exists(jobs, job_id: str) -> bool:
    try:
        jobs.get_job_info(job_id)
        return True
    except RuntimeError as e:
        if "404" in str(e).splitlines()[0]:
            return False
        raise


def status(address: str | None, job_id: str) -> str:
    """The job's status; with Ray's reason when it did not succeed."""
    with cluster(address) as jobs:
        return describe(jobs.get_job_info(job_id))


def describe(info) -> str:
    """``STATUS`` or ``STATUS: reason`` (the entry point's exit code and last log line for a failed run)."""
    state = str(info.status.value)
    if state in ("SUCCEEDED", "RUNNING", "PENDING") or not info.message:
        return state
    head, _, logs = info.message.partition(", last available logs")
    last = next((line for line in reversed(logs.partition(":\n")[2].splitlines()) if line.strip()), "")
    reason = f"{head.rstrip('.')}: {last.strip()}" if last else head.strip()
    if "No module named 'mmcurate'" in reason or info.driver_exit_code == 127:  # 127: the shell found no such interpreter
        reason += " (the job's python has no mmcurate: pass --python /path/to/env/bin/python or --pip 'mmcurate[ray]')"
    return f"{state}: {reason}"


def logs(address: str | None, job_id: str, follow: bool = False) -> None:
    """Print the job's logs; with ``follow``, as they come until the job ends."""
    with cluster(address) as jobs:
        if follow:
            _follow(jobs, job_id)
        else:
            print(jobs.get_job_logs(job_id), end="")


def _follow(jobs, job_id: str) -> None:
    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    jobs.get_job_info(job_id)  # an unknown job: one line, before the websocket
    asyncio.run(tail())


def stop(address: str | None, job_id: str) -> bool:
    """Ask the job to stop; whether it was still running."""
    with cluster(address) as jobs:
        return jobs.stop_job(job_id)


def wait(address: str | None, job_id: str, poll_s: float = 1.0) -> str:
    """Print the job's logs as they come until it ends; its final status line (:func:`describe`)."""
    with cluster(address) as jobs:
        _follow(jobs, job_id)
        while str(jobs.get_job_status(job_id).value) not in TERMINAL:  # the log stream can end just before the status
            time.sleep(poll_s)
        return describe(jobs.get_job_info(job_id))


def command(args, pipeline: Pipeline | None) -> int:
    """``mmcurate submit`` (with ``pipeline``) and ``mmcurate jobs status|logs|stop``."""
    if pipeline is None:
        if args.action == "status":
            print(status(args.address, args.job_id))
        elif args.action == "logs":
            try:
                logs(args.address, args.job_id, follow=args.follow)
            except KeyboardInterrupt:
                return 130  # stopped following; the job goes on
        else:
            print("stopping" if stop(args.address, args.job_id) else "not running")
        return 0
    job_id = submit(pipeline, args.address, args.pip, args.job_id, args.python, _env(args.env), args.working_dir)
    try:  # from here on, Ctrl-C leaves a submitted job
        print(f"submitted {job_id}", flush=True)
        if not args.wait:
            return 0
        final = wait(args.address, job_id)
    except KeyboardInterrupt:
        where = f" --address {shlex.quote(args.address)}" if args.address else ""
        print(
            f"\nmmcurate: stopped waiting; job {job_id} goes on running on the cluster. "
            f"Follow it: mmcurate jobs logs {job_id} --follow{where}; stop it: mmcurate jobs stop {job_id}{where}",
            file=sys.stderr,
        )
        return 130
    print(f"{job_id} {final}")
    return 0 if final == "SUCCEEDED" else 1


def refuse_ignored(args) -> None:
    """One line for a `run` flag that `submit` would ignore."""
    for flag, why in IGNORED_FLAGS.items():
        if getattr(args, flag, None) not in (None, False):
            raise UsageError(f"submit does not take {why}")


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env wants KEY=VALUE, not {pair!r}")
        env[key] = value
    return env
