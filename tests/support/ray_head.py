"""A real Ray head (``ray start --head --block``) on 127.0.0.1 for the job tests: free ports, its own
temp folder, its own process group (so only its processes are stopped afterwards)."""

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RayHead:
    address: str  # the dashboard (Jobs API), http://127.0.0.1:PORT
    temp: Path  # RAY_TMPDIR of the head: ``ray.init()`` with the same RAY_TMPDIR finds it as a head node's process would
    env: dict[str, str]  # the environment it was started with


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open until every one is chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextmanager
def ray_head(env: dict[str, str] | None = None, num_cpus: int = 2) -> Iterator[RayHead]:
    """Start a head with the dashboard on free ports and ``env`` added to a clean environment (no ``RAY_*``
    from the caller); token auth is off unless ``env`` sets ``RAY_AUTH_MODE``."""
    temp = Path(tempfile.mkdtemp(prefix="mmray", dir="/tmp"))
    bin_dir = Path(sys.executable).parent
    head_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    head_env["PATH"] = f"{bin_dir}{os.pathsep}{head_env.get('PATH', '')}"  # the job's `python` is this venv's
    head_env["RAY_AUTH_MODE"] = "disabled"  # a throw-away head on 127.0.0.1: no token to hand around
    head_env["RAY_TMPDIR"] = str(temp)
    head_env |= env or {}
    log_path = temp / "head.log"
    head = None
    try:
        for _ in range(3):  # Ray gives a raylet a fixed 30 s to register: a loaded 2-core machine may miss it, and the head exits
            ports = _head_ports()
            with open(log_path, "wb") as log:
                cmd = [str(bin_dir / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1"]
                cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--object-store-memory={200 * 2**20}"]
                cmd += ["--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
                head = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            address = f"http://127.0.0.1:{ports['dashboard-port']}"
            if _wait_for_jobs_api(address, head):
                break
            stop_group(head)
        else:
            raise RuntimeError(f"ray start exited three times: {log_path.read_text()[-2000:]}")
        while not (temp / "ray" / "ray_current_cluster").exists():  # written just after the dashboard is up
            time.sleep(0.2)
        yield RayHead(address, temp, head_env)
    finally:
        if head is not None:
            stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def _head_ports() -> dict[str, int]:
    """Every port of a head, free, so that it does not collide with other heads or nodes on this host."""
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
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    worker_base = random.randrange(20000, 30000, 100)  # below Linux's ephemeral range, where the ports above come from
    return ports | {"min-worker-port": worker_base, "max-worker-port": worker_base + 99}


def stop_group(proc: subprocess.Popen, grace: float = 3) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to the process group of a ``ray start --block``
    (everything it started, and only that)."""
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_jobs_api(address: str, head: subprocess.Popen) -> bool:
    """Until the dashboard answers (any HTTP answer, 401 included: the head is up); False if the head exited."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 90
    while True:
        if head.poll() is not None:
            return False
        try:
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=5).close()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
