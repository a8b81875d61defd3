"""s3:// output on a real S3 API (moto's server, started by the tests): a whole run, a resume after
kill -9 and validate/inspect give what the same run gives on a local disk; a missing driver is one line."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmcurate import killpoints
from mmcurate.cli import main
from mmcurate.shards.layout import OutputDir
from mmcurate.tests.support.foundation import (
    assert_same_output,
    assert_usage_error,
    laion_csv_with_repeats,
    register,
    toy_cli_command,
    write_yaml,
)

STAGES = [{"drop_word": {"word": "wallpaper"}}, "caption_dedup", {"slow": {"seconds": 0}}]


@pytest.fixture(scope="module")
def urls(tmp_path_factory, laion_sample: Path) -> Path:
    """90 LAION rows as CSV (parsed into the output's work folder), every 7th caption repeating the one before."""
    return laion_csv_with_repeats(laion_sample, tmp_path_factory.mktemp("s3in") / "urls.csv", 90)


def pipeline_yaml(folder: Path, src: Path, out: str) -> Path:
    config = {
        "input": {"path": str(src), "url_col": "URL", "caption_col": "TEXT"},
        "output": {"path": out, "rows_per_shard": 30},
        "workers": 1,
        "engine": "local",
        "stages": STAGES,
    }
    return write_yaml(folder / f"pipeline-{abs(hash(out))}.yaml", config)


def run(config: Path, env: dict[str, str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**env, killpoints.ENV: kill_at} if kill_at else env
    command = toy_cli_command("run", str(config), "--no-progress")
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, urls: Path) -> Path:
    """The same pipeline's output on a local disk."""
    folder = tmp_path_factory.mktemp("local")
    result = run(pipeline_yaml(folder, urls, str(folder / "out")), dict(os.environ))
    assert result.returncode == 0, result.stderr
    return folder / "out"


def download(fs, url: str, dest: Path) -> Path:
    """Every object under ``url`` copied into ``dest``, keeping relative paths."""
    root = url.removeprefix("s3://")
    for key in fs.find(root):
        target = dest / key[len(root) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))
    return dest


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_whole_run_on_s3_validates_and_equals_the_local_run(s3, s3_env, urls: Path, local_run: Path, tmp_path: Path, capsys) -> None:
    fs, bucket = s3
    out = f"{bucket}/out"
    result = run(pipeline_yaml(tmp_path, urls, out), s3_env)
    assert result.returncode == 0, result.stderr
    fs.invalidate_cache()
    assert cli(capsys, "validate", out)[:2] == (0, "valid\n")
    code, report, _ = cli(capsys, "inspect", out)
    assert code == 0 and "shards: 3 written, 3 done" in report
    code, _, _ = cli(capsys, "report", out, "-o", str(tmp_path / "report.html"), "--samples", "4")
    totals = json.loads((local_run / "run.json").read_text())["totals"]
    assert code == 0 and json.loads((tmp_path / "report.json").read_text())["summary"]["kept"] == totals["kept"]
    assert_same_output(download(fs, out, tmp_path / "copy"), local_run)


@pytest.mark.parametrize("point", ["write:9", "global:1", "write:19"])
def test_run_killed_on_s3_resumes_to_the_local_run(point: str, s3, s3_env, urls: Path, local_run: Path, tmp_path: Path, capsys) -> None:
    """Killed with SIGKILL while writing (a temporary object not yet copied to its name) or at the global step."""
    fs, bucket = s3
    out = f"{bucket}/out"
    config = pipeline_yaml(tmp_path, urls, out)
    killed = run(config, s3_env, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    fs.invalidate_cache()
    assert cli(capsys, "validate", out)[0] == 1  # an unfinished run is not valid
    resumed = run(config, s3_env)
    assert resumed.returncode == 0, resumed.stderr
    fs.invalidate_cache()
    assert cli(capsys, "validate", out)[:2] == (0, "valid\n")
    assert_same_output(download(fs, out, tmp_path / "copy"), local_run)


DRIVERS = [("s3://bucket/out", "s3fs", "mmcurate[s3]"), ("gs://bucket/out", "gcsfs", "mmcurate[gcs]")]


@pytest.mark.parametrize(("url", "module", "extra"), DRIVERS)
def test_missing_driver_is_one_line(url: str, module: str, extra: str, urls: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    register(monkeypatch)
    protocols = ("s3", "s3a") if module == "s3fs" else ("gs", "gcs")
    registry = importlib.import_module("fsspec.registry")._registry  # the drivers imported so far, by protocol
    for protocol in protocols:
        monkeypatch.delitem(registry, protocol, raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed: importing it fails
    code, _, err = cli(capsys, "run", str(pipeline_yaml(tmp_path, urls, url)), "--no-progress")
    assert_usage_error(subprocess.CompletedProcess([], code, "", err), extra, url)


def test_a_refused_run_on_a_new_s3_output_is_one_line_and_leaves_nothing(s3, s3_env, urls: Path, tmp_path: Path) -> None:
    """A run refused after taking the lease (here an unknown stage) removes the lease; no folder to remove on S3."""
    fs, bucket = s3
    config = pipeline_yaml(tmp_path, urls, f"{bucket}/out")
    config.write_text(config.read_text().replace("caption_dedup", "no_such_stage"))
    assert_usage_error(run(config, s3_env), "unknown stage 'no_such_stage'")
    fs.invalidate_cache()
    assert fs.find(bucket.removeprefix("s3://")) == []


def test_the_driver_sees_what_workers_write_after_it_listed(s3) -> None:
    """A resuming driver lists the output (leftovers of a killed run), then its workers write into it: it
    must see their files (a cached listing hid them: 'N shards are unfinished' on a finished resume)."""
    import s3fs

    _, bucket = s3
    worker = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's view
    root = bucket.removeprefix("s3://") + "/out"
    worker.pipe_file(f"{root}/shards/00000.parquet", b"0")
    worker.pipe_file(f"{root}/_done/.tmp-0123456789abcdef0123456789abcdef-00001", b"")
    out = OutputDir.open(f"{bucket}/out")
    out.remove_partial_writes()  # lists every folder of the output
    worker.pipe_file(f"{root}/shards/00001.parquet", b"01")
    assert out.exists(f"{root}/shards/00001.parquet") and out.fs.size(f"{root}/shards/00001.parquet") == 2


@pytest.mark.parametrize("cause", ["endpoint", "credentials"])
def test_an_unreachable_store_is_one_line_before_anything_is_written(cause: str, urls: Path, tmp_path: Path) -> None:
    """A dead endpoint or no credentials: ``run`` (the store as input or as output) and ``validate`` say so in
    one line naming the URL, where the client library's traceback came halfway through the run."""
    nowhere = tmp_path / "none"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"}  # one try, no instance metadata to wait for
    env |= {"AWS_CONFIG_FILE": str(nowhere), "AWS_SHARED_CREDENTIALS_FILE": str(nowhere)}
    if cause == "endpoint":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed once the block ends: nothing listens there
        env |= {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
    said = {"endpoint": "Could not connect to the endpoint URL", "credentials": "Unable to locate credentials"}[cause]
    local = tmp_path / "out"
    for src, out in (("s3://bucket/in/urls.csv", str(local)), (str(urls), "s3://bucket/out")):
        result = run(pipeline_yaml(tmp_path, src, out), env)
        assert_usage_error(result, f"cannot reach {src if out == str(local) else out}: {said}", "AWS_ENDPOINT_URL")
        assert not local.exists()
    command = toy_cli_command("validate", "s3://bucket/out")
    validate = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert_usage_error(validate, f"cannot reach s3://bucket/out: {said}")
