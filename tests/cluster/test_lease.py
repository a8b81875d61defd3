"""One writer per output: a run holds a lease on its output; a second run on a live lease is refused
in one line naming the holder, a stale lease (old heartbeat, or a dead process on this host) is
taken over; the create is exclusive on a local disk and on S3 (a conditional put)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from mmcurate.cli import main
from mmcurate.errors import UsageError
from mmcurate.shards import lease
from mmcurate.tests.support.foundation import LAION, assert_usage_error, hold, register


@pytest.fixture
def urls(tmp_path: Path, laion_sample: Path) -> Path:
    path = tmp_path / "urls.parquet"
    pq.write_table(pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, 20), path)
    return path


def stage(capsys, monkeypatch, src: Path, out: str) -> subprocess.CompletedProcess:
    """``mmcurate stage drop_word`` in this process."""
    register(monkeypatch)
    capsys.readouterr()
    code = main(["stage", "drop_word", "--input", str(src), "--output", out, "--workers", "1", "--no-progress", *LAION])
    stdout, stderr = capsys.readouterr()
    return subprocess.CompletedProcess([], code, stdout, stderr)


def test_a_run_releases_its_lease(tmp_path: Path, urls: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    assert stage(capsys, monkeypatch, urls, str(out)).returncode == 0
    assert (out / "run.json").exists() and not (out / lease.LEASE).exists()


@pytest.mark.parametrize("holder", [{}, {"host": "node-7.invalid", "pid": 1}])
def test_a_live_lease_refuses_a_second_run(holder: dict, tmp_path: Path, urls: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    hold(str(out), **holder)
    result = stage(capsys, monkeypatch, urls, str(out))
    assert_usage_error(result, "another run", "alice", holder.get("host", socket.gethostname()))
    assert sorted(p.name for p in out.iterdir()) == [lease.LEASE]  # nothing written


@pytest.mark.parametrize("holder", [{"heartbeat": time.time() - 10 * lease.STALE_AFTER, "host": "node-7.invalid"}, {"pid": 2**22 + 1}])
def test_a_stale_lease_is_taken_over(holder: dict, tmp_path: Path, urls: Path, capsys, monkeypatch) -> None:
    """An old heartbeat (any host), or a holder on this host whose process is gone (a killed run)."""
    out = tmp_path / "out"
    out.mkdir()
    hold(str(out), **holder)
    assert stage(capsys, monkeypatch, urls, str(out)).returncode == 0
    assert (out / "run.json").exists() and not (out / lease.LEASE).exists()


def test_concurrent_runs_one_wins(tmp_path: Path, urls: Path) -> None:
    """Two processes start on one output at once: exactly one takes it (the other is refused or finds it finished)."""
    out = tmp_path / "out"
    code = (
        "import sys; from mmcurate.shards import lease; import fsspec, time; "
        f"l = lease.acquire(fsspec.filesystem('file'), {str(out)!r}); print('took', flush=True); time.sleep(3); l.release()"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    assert sorted(r[0] for r in results) == ["", "took\n"], results
    assert any("another run" in r[1] for r in results), results


RACE = """
import pathlib, sys, time, fsspec
from mmcurate.errors import UsageError
from mmcurate.shards import lease

root, meet, me = sys.argv[1:4]
judge, first = lease._stale, [True]

def stale_once_both_judged(held):  # both takers judge the stale lease before either replaces it
    verdict = judge(held)
    if first.pop() if first else False:
        pathlib.Path(meet, me).touch()
        while len(list(pathlib.Path(meet).iterdir())) < 2:
            time.sleep(0.01)
    return verdict

lease._stale = stale_once_both_judged
fs, path = fsspec.core.url_to_fs(root)
try:
    held = lease.acquire(fs, path)
except UsageError as e:
    sys.exit(f"refused: {e}")
print("took", flush=True)
time.sleep(3)
held.release()
"""


@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_takers_of_one_stale_lease_one_wins(store: str, tmp_path: Path, request) -> None:
    """Two runs find one stale lease at once: one replaces it, the other is refused naming a live run (no double takeover)."""
    if store == "s3":
        fs, bucket = request.getfixturevalue("s3")
        root, env = f"{bucket}/out", request.getfixturevalue("s3_env")
        path = root.removeprefix("s3://")
    else:
        fs, env = fsspec.filesystem("file"), None
        root = path = str(tmp_path / "out")
        fs.makedirs(path)
    hold(path, fs, host="node-7.invalid", heartbeat=time.time() - 10 * lease.STALE_AFTER)
    (tmp_path / "meet").mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, root, str(tmp_path / "meet"), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("a", "b")
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert sorted(r[0] for r in results) == ["", "took\n"], results
    refused = next(r[1] for r in results if not r[0])
    assert refused.startswith("refused: ") and ("another run" in refused or "keep taking it over" in refused), results
    assert fs.find(path) == []  # the winner released the lease; no takeover marker is left


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_stalled_heartbeat_never_overwrites_a_takeover(store: str, tmp_path: Path, monkeypatch, request) -> None:
    """The holder reads its lease, stalls past STALE_AFTER, and another run takes the lease over before the
    holder writes its heartbeat: the heartbeat leaves the new lease alone and the holder stops renewing."""
    if store == "s3":
        fs, bucket = request.getfixturevalue("s3")
        root = f"{bucket.removeprefix('s3://')}/out"
    else:
        fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    held = lease.acquire(fs, root)
    parse, stalled = lease._parse, []

    def taken_over_while_stalled(raw):
        if not stalled:  # between the holder's read and its write
            stalled.append(True)
            hold(root, fs, token="taker", host="node-7.invalid")
        return parse(raw)

    monkeypatch.setattr(lease, "_parse", taken_over_while_stalled)
    assert held.renew() is False
    monkeypatch.setattr(lease, "_parse", parse)
    assert lease._read(fs, f"{root}/{lease.LEASE}")["token"] == "taker"
    assert held.renew() is False  # and it stays the taker's
    held.release()
    assert lease._read(fs, f"{root}/{lease.LEASE}")["token"] == "taker"
    assert [p.rsplit("/", 1)[-1] for p in fs.find(root)] == [lease.LEASE]  # no marker left


def test_a_live_holder_renews_its_heartbeat(tmp_path: Path) -> None:
    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    held = lease.acquire(fs, root)
    before = lease._read(fs, f"{root}/{lease.LEASE}")
    time.sleep(0.01)
    assert held.renew() is True
    after = lease._read(fs, f"{root}/{lease.LEASE}")
    assert after["token"] == before["token"] and after["heartbeat"] > before["heartbeat"]
    held.release()
    assert fs.find(root) == []


def test_lease_on_s3_is_a_conditional_put(s3) -> None:
    fs, bucket = s3
    root = f"{bucket.removeprefix('s3://')}/out"
    held = lease.acquire(fs, root)
    with pytest.raises(FileExistsError):
        lease._create(fs, f"{root}/{lease.LEASE}", {"token": "second"})  # If-None-Match: * refuses an existing object
    hold(root, fs, host="node-7.invalid")  # another host's live run holds it
    with pytest.raises(UsageError, match="node-7.invalid"):
        lease.acquire(fs, root)
    held.release()  # the lease is no longer ours: left alone
    assert fs.exists(f"{root}/{lease.LEASE}")
    hold(root, fs, host="node-7.invalid", heartbeat=time.time() - 10 * lease.STALE_AFTER)
    lease.acquire(fs, root).release()
    assert not fs.exists(f"{root}/{lease.LEASE}")
