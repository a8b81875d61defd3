"""Every Ray node must see a run's storage: on a two-node cluster whose second node cannot enter or
write the output folder, a run is refused before any download, in one line naming that node.

The output folder belongs to the Unix user ``mmcurate-node``. The head (and the driver) run as root; the
second node runs as root without the capabilities that let root ignore file permissions (``setpriv``
drops them), so it has the rights of any user but the folder's owner. (It cannot run as that user
itself: the interpreter may live where only root can reach, e.g. under /root, and Ray refuses a node
whose Python differs from the head's in its patch version.)"""

from __future__ import annotations

import http.server
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ray = pytest.importorskip("ray")

from mmcurate.tests.support.ray_head import free_ports, stop_group

pytestmark = pytest.mark.slow

USER = "mmcurate-node"  # owns the output folder: only root with all its capabilities (the driver) may write there too
UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]  # root, bound by file permissions
MARK = "mmcurate_second_node"  # a custom resource that tells the second node apart


def _node_ports() -> list[str]:
    """Every port of a node, free, so that two nodes (and other tests) on this host do not collide."""
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port")
    names += ("runtime-env-agent-port", "metrics-export-port")
    base = random.randrange(20000, 30000, 100)  # worker ports below Linux's ephemeral range, where the ports above come from
    ports = {**dict(zip(names, free_ports(len(names)), strict=True)), "min-worker-port": base, "max-worker-port": base + 49}
    return [f"--{k}={v}" for k, v in ports.items()]


def _unix_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root: the output folder belongs to another Unix user, and the second node drops root's capabilities")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot start the second node without root's capabilities")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        pytest.skip(f"useradd is not installed: cannot create the Unix user {USER} that owns the output folders")
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True, capture_output=True)
    return pwd.getpwnam(USER)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[str, Path, pwd.struct_passwd]]:
    """A head (root) and a second node (root without its file capabilities) on 127.0.0.1; yields the head's
    address, a folder both can read and the owner of the output folders."""
    user = _unix_user()
    shared = Path(tempfile.mkdtemp(prefix="mmshared", dir="/tmp"))
    shared.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    ray_bin = str(Path(sys.executable).parent / "ray")
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--object-store-memory={80 * 2**20}", "--disable-usage-stats"]
    (gcs,) = free_ports(1)
    procs: list[subprocess.Popen] = []
    try:
        head_temp = shared / "head"
        head_temp.mkdir()
        cmd = [ray_bin, "start", "--head", f"--port={gcs}", "--include-dashboard=false", f"--temp-dir={head_temp}", *common]
        cmd += [f"--ray-client-server-port={free_ports(1)[0]}"]
        _start_node(cmd, env, head_temp / "node.log", f"127.0.0.1:{gcs}", procs)
        node_temp = shared / "second"
        node_temp.mkdir()
        cmd = [*UNPRIVILEGED, ray_bin, "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={node_temp}", f'--resources={{"{MARK}": 1}}']
        _start_node([*cmd, *common], env, node_temp / "node.log", f"127.0.0.1:{gcs}", procs)
        yield f"127.0.0.1:{gcs}", shared, user
    finally:
        for proc in reversed(procs):
            stop_group(proc, grace=5)
        shutil.rmtree(shared, ignore_errors=True)


def _start_node(cmd: list[str], env: dict[str, str], log: Path, address: str, procs: list[subprocess.Popen]) -> None:
    """Start one more node and wait until the cluster counts it, one node at a time so that two startups do not
    compete for this machine's cores. Ray gives a raylet a fixed 30 s to register: on a loaded 2-core machine it
    may miss that, and ``ray start`` exits, so a node that exited is started again (fresh ports), up to three times."""
    for _ in range(3):
        with open(log, "wb") as f:
            proc = subprocess.Popen([*cmd, *_node_ports()], env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        if _wait_for_nodes(address, len(procs), proc, log):
            return
        procs.pop()
        stop_group(proc, grace=5)
    raise RuntimeError(f"ray start exited three times: {log.read_text()[-2000:]}")


def _wait_for_nodes(address: str, n: int, proc: subprocess.Popen, log: Path) -> bool:
    """Until ``n`` nodes are alive (asked in a subprocess, so this one's Ray stays as it is); False if ``proc`` exited."""
    ask = f"import ray; ray.init(address={address!r}, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        done = subprocess.run(
            [sys.executable, "-c", ask], capture_output=True, text=True, check=False, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
        )
        if done.stdout.strip() == str(n):
            return True
        time.sleep(2)
    raise RuntimeError(f"{n} Ray nodes did not come up: {log.read_text()[-2000:]}")


class _Counted(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("mode", "cannot"), [(0o700, "cannot read the output folder"), (0o755, "cannot write to the output folder")])
def test_a_run_whose_output_one_node_cannot_see_is_refused_naming_it(mode: int, cannot: str, two_nodes, tmp_path: Path) -> None:
    """The second node cannot enter the output folder (700), or can read but not write it (755)."""
    address, shared, owner = two_nodes
    shared = shared / tmp_path.name
    shared.mkdir(mode=0o755)
    _Counted.requests.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    inputs = shared / "input"
    inputs.mkdir(mode=0o755)
    urls = inputs / "urls.parquet"
    pq.write_table(
        pa.table({"url": [f"{base}/{i}.jpg" for i in range(6)], "caption": [f"photo number {i} of six" for i in range(6)]}), urls
    )
    urls.chmod(0o644)
    out = shared / "out"
    out.mkdir()
    os.chown(out, owner.pw_uid, owner.pw_gid)
    out.chmod(mode)
    pipeline = shared / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump({"input": {"path": str(urls)}, "output": {"path": str(out), "rows_per_shard": 3}, "stages": ["download"]})
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    run = "import sys; from mmcurate.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", run, "run", str(pipeline), "--engine", "ray", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    server.shutdown()
    node_id, node_ip = _second_node(address)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if "\tINFO " not in line]  # Ray's own lines as it connects
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"mmcurate: error: node {node_id} ({node_ip}, ")
    assert f"{cannot} {out}: PermissionError" in lines[0] and "Permission denied" in lines[0]
    assert _Counted.requests == []  # refused before any download
    assert list(out.iterdir()) == []  # nothing written, the probes and the lease removed


def _second_node(address: str) -> tuple[str, str]:
    """The second node's id and address."""
    ask = f"import ray; ray.init(address={address!r}, log_to_driver=False)"
    ask += f"; print(*[(n['NodeID'] + ' ' + n['NodeManagerAddress']) for n in ray.nodes() if '{MARK}' in n['Resources']])"
    done = subprocess.run(
        [sys.executable, "-c", ask], capture_output=True, text=True, check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
    )
    node_id, node_ip = done.stdout.split()
    return node_id, node_ip
