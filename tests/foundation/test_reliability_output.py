"""Reliability of the output side (issue 15): an output folder is written only when it is empty or
holds the same run, done markers are tied to the run and its files, a finished run re-runs as a
no-op, validate fails incomplete output, pool workers die with their parent, and user mistakes
about the output are one line with exit 2."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate import killpoints
from mmcurate.engines.local import run_local
from mmcurate.errors import UsageError
from mmcurate.exports import export
from mmcurate.pipelines.config import Pipeline, StageSpec, parse_pipeline
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.readers import InputSpec
from mmcurate.shards.writers import OutputSpec
from mmcurate.tests.support.foundation import (
    LAION,
    assert_same_output,
    assert_usage_error,
    check_accounting,
    kept_table,
    laion_csv_with_repeats,
    register,
    sorted_files,
    toy_cli_command,
    write_yaml,
)
from mmcurate.tooling.report import build_report

SMALL = (*LAION, "--rows-per-shard", "40")  # 3 shards of the 120 rows


@pytest.fixture(scope="module")
def urls(tmp_path_factory, laion_sample: Path) -> Path:
    """120 LAION rows where every 10th row repeats the caption of the row before it."""
    table = pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, 120)
    rows = table.to_pylist()
    for i in range(10, len(rows), 10):
        rows[i]["TEXT"] = rows[i - 1]["TEXT"]
    path = tmp_path_factory.mktemp("urls") / "urls.parquet"
    pq.write_table(table.from_pylist(rows), path)
    return path


@pytest.fixture
def cli(capsys, monkeypatch):
    """The ``mmcurate`` command in this process, with the toy stages: ``cli(*ARGS, cwd=None)`` gives
    a CompletedProcess (cheaper than a subprocess per call)."""
    from mmcurate.cli import main

    register(monkeypatch)

    def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        argv = [str(a) for a in args]
        if argv[0] in ("run", "stage"):
            argv.append("--no-progress")
        code = main(argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return run


def stage(cli, src: Path | str, out: Path | str, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``mmcurate stage drop_word --input SRC --output OUT --workers 1 EXTRA``."""
    return cli("stage", "drop_word", "--input", src, "--output", out, "--workers", "1", *extra, cwd=cwd)


def pipeline(src: Path, out: Path, stages: list[StageSpec] | None = None, workers: int = 1) -> Pipeline:
    stages = [StageSpec("drop_word", {"word": "wallpaper"}), StageSpec("caption_dedup")] if stages is None else stages
    spec = InputSpec(str(src), url_col="URL", caption_col="TEXT")
    return Pipeline(spec, OutputSpec(str(out), format="webdataset", rows_per_shard=40), stages, workers=workers)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time."""
    return {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns) for name in sorted_files(folder)}


def crash_state(out: Path) -> None:
    """Make a finished output look like a run killed before its end."""
    record = json.loads((out / "run.json").read_text())
    record["finished"] = None
    record.pop("totals")
    (out / "run.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# 1. An output folder that is not empty


def test_foreign_folder_is_refused_and_left_unchanged(tmp_path: Path, urls: Path, cli) -> None:
    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    (out / "_work" / "notes.txt").write_text("mine")
    (out / "shards").mkdir()
    (out / "shards" / "00000.tar").write_bytes(b"not yours")
    (out / "shards" / "sizes.json").write_text("{}")
    before = snapshot(out)
    assert_usage_error(stage(cli, urls, out, *LAION), "holds shards but no run.json")
    assert snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_usage_error(stage(cli, urls, other, *LAION), "not empty")
    assert sorted_files(other) == ["notes.txt"]


def test_empty_output_path_is_refused(tmp_path: Path, urls: Path, cli) -> None:
    (tmp_path / "_work").mkdir()
    (tmp_path / "_work" / "notes.txt").write_text("mine")
    result = stage(cli, urls, "x", *LAION, "--set", "output.path=", cwd=tmp_path)
    assert_usage_error(result, "output path is empty")
    assert sorted_files(tmp_path) == ["_work/notes.txt"]


def test_filesystem_root_is_judged_on_its_own_contents(tmp_path: Path, urls: Path, cli) -> None:
    """The filesystem root "/" is not "" (the current folder): it is refused for what it holds, before any lease is written into it."""
    assert OutputDir.open("/").root == "/" and OutputDir.open("/").path("run.json") == "/run.json"
    cwd = tmp_path / "empty"
    cwd.mkdir()
    first = min(os.listdir("/"))
    for root in ("/", "file:///", "//"):
        assert_usage_error(stage(cli, urls, root, *LAION, cwd=cwd), "/ is not empty", f"({first}, ...)")
    assert sorted_files(cwd) == [] and not os.path.exists("/_lease.json") and not os.path.exists("/run.json")


def test_work_folder_mmcurate_did_not_write_is_never_touched(tmp_path: Path, urls: Path, cli) -> None:
    out = tmp_path / "out"
    assert stage(cli, urls, out, *SMALL).returncode == 0
    (out / "_work").mkdir()
    (out / "_work" / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert_usage_error(stage(cli, urls, out, *SMALL), f"{out / '_work'} holds files mmcurate did not write")
    assert snapshot(out) == before
    crash_state(out)  # a resume refuses it too, as does a new run's start
    (out / "_done" / "00001").unlink()
    before = snapshot(out)
    assert_usage_error(stage(cli, urls, out, *SMALL), "_work holds files mmcurate did not write")
    assert snapshot(out) == before
    fresh = tmp_path / "fresh"
    (fresh / "_work").mkdir(parents=True)
    (fresh / "_work" / "notes.txt").write_text("mine")
    assert_usage_error(stage(cli, urls, fresh, *SMALL), "not empty", "(_work, ...)")
    assert sorted_files(fresh) == ["_work/notes.txt"]
    (out / "_work" / "notes.txt").rename(tmp_path / "notes.txt")  # moved away: the resume goes on
    assert stage(cli, urls, out, *SMALL).returncode == 0
    assert check_accounting(out)["rows_in"] == 120 and not (out / "_work").exists()


def test_corrected_command_replaces_a_run_stopped_at_its_start(tmp_path: Path, urls: Path, cli, monkeypatch, caplog) -> None:
    """A usage error a worker meets after run.json is written (a stage's setup) leaves a record of a run that
    wrote no results: the corrected command, another pipeline, starts in its place; one that wrote results is refused."""
    from mmcurate.errors import UsageError
    from mmcurate.tests.support.foundation import DropWord

    def broken(self) -> None:
        raise UsageError(f"drop_word: no list for {self.config.word!r}")

    monkeypatch.setattr(DropWord, "setup", broken)
    out = tmp_path / "out"
    assert_usage_error(stage(cli, urls, out, *SMALL, "--set", "word=dog"), "no list for 'dog'")
    assert (out / "run.json").exists() and not OutputDir.open(str(out)).wrote_results()
    monkeypatch.undo()
    register(monkeypatch)
    fixed = stage(cli, urls, out, *SMALL, "--set", "word=cat")
    assert fixed.returncode == 0, fixed.stderr
    assert "another pipeline's run that wrote no results" in caplog.text
    record = json.loads((out / "run.json").read_text())
    assert record["pipeline"]["stages"] == [{"drop_word": {"word": "cat"}}] and record["finished"]
    assert check_accounting(out)["rows_in"] == 120
    crash_state(out)
    (out / "_done" / "00002").unlink()  # a run that wrote shards is another pipeline's output, kept
    before = snapshot(out)
    assert_usage_error(stage(cli, urls, out, *SMALL, "--set", "word=dog"), "different pipeline")
    assert snapshot(out) == before


def test_stage_option_mistakes_stop_the_run_before_it_writes(tmp_path: Path, urls: Path, cli) -> None:
    """Mistakes a stage finds without loading anything (Stage.check) or against the input's columns end the run
    before run.json: no output folder is left, so the corrected command is no other pipeline's output."""
    out = tmp_path / "out"
    mistakes = {
        ("blocklist", "domains=missing.txt"): "blocklist: cannot read 'missing.txt'",
        ("blocklist", f"keys={tmp_path}"): f"blocklist: cannot read '{tmp_path}'",
        ("language", "model_path=/nonexistent/lid.bin"): "cannot load fastText model '/nonexistent/lid.bin' (no such file)",
        ("select", "min={aesthetic: 3}"): "stage select needs column 'aesthetic', which neither an earlier stage nor the parquet input",
    }
    for (name, setting), message in mistakes.items():
        result = cli("stage", name, "--input", urls, "--output", out, *LAION, "--set", setting, cwd=tmp_path)
        assert_usage_error(result, message)
        assert not out.exists()
    scored = tmp_path / "scored.parquet"
    pq.write_table(pq.read_table(urls).append_column("aesthetic", pa.array([float(i % 7) for i in range(120)])), scored)
    kept = cli("stage", "select", "--input", scored, "--output", out, *LAION, "--set", "min={aesthetic: 3}", "--workers", "1")
    assert kept.returncode == 0, kept.stderr
    assert check_accounting(out)["kept"] == sum(i % 7 >= 3 for i in range(120))


def test_intermediates_count_as_results(tmp_path: Path) -> None:
    out = OutputDir.open(str(tmp_path))
    out.claim()
    out.write_bytes(out.work_path("input", "00000.parquet"), b"parsed")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".tmp-0a1b-00000.tar").write_bytes(b"half")
    assert not out.wrote_results()
    out.write_bytes(out.work_path("seg0", "00000.arrow"), b"rows")
    assert out.wrote_results()


def test_deleted_run_json_with_other_options_is_refused(tmp_path: Path, urls: Path, cli) -> None:
    out = tmp_path / "out"
    assert stage(cli, urls, out, *LAION).returncode == 0
    (out / "run.json").unlink()
    before = snapshot(out)
    assert_usage_error(stage(cli, urls, out, *LAION, "--set", "word=cat"), "no run.json")
    assert snapshot(out) == before


def test_stray_stats_file_is_ignored(tmp_path: Path, urls: Path, monkeypatch) -> None:
    register(monkeypatch)
    out = tmp_path / "out"
    run_local(pipeline(urls, out), progress=False)
    crash_state(out)
    (out / "_stats" / "00007.json").write_text('{"note": "not mmcurate\'s"}')
    summary = run_local(pipeline(urls, out), progress=False)
    assert summary["shards"] == 3 and summary["rows_in"] == 120
    assert (out / "_stats" / "00007.json").read_text() == '{"note": "not mmcurate\'s"}'
    assert "00007.tar" not in json.loads((out / "shards" / "sizes.json").read_text())


def test_done_marker_of_another_run_is_not_trusted(tmp_path: Path, urls: Path, monkeypatch) -> None:
    register(monkeypatch)
    first, out = tmp_path / "first", tmp_path / "out"
    run_local(pipeline(urls, first, [StageSpec("drop_word")]), progress=False)
    run_local(pipeline(urls, out, [StageSpec("drop_word")]), progress=False)
    crash_state(out)
    for name in ("shards/00000.tar", "meta/00000.parquet", "rejects/00000.parquet", "_stats/00000.json"):
        (out / name).unlink()
    (out / "_done" / "00000").write_bytes((first / "_done" / "00000").read_bytes())
    run_local(pipeline(urls, out, [StageSpec("drop_word")]), progress=False)
    assert check_accounting(out)["rows_in"] == 120


def test_done_marker_covers_the_shard_files(tmp_path: Path, urls: Path, monkeypatch) -> None:
    register(monkeypatch)
    run_local(pipeline(urls, tmp_path / "out", [StageSpec("drop_word")]), progress=False)
    out = OutputDir.open(str(tmp_path / "out"))
    assert out.run_id and all(out.is_done(i) for i in range(3))
    assert sorted(json.loads((tmp_path / "out" / "_done" / "00001").read_text())["files"]) == [
        "_stats/00001.json",
        "meta/00001.parquet",
        "rejects/00001.parquet",
        "shards/00001.tar",
    ]
    other_run = OutputDir(out.fs, out.root, "another-run")
    assert not other_run.is_done(0)
    with open(tmp_path / "out" / "meta" / "00001.parquet", "ab") as f:
        f.write(b"changed")
    (tmp_path / "out" / "rejects" / "00002.parquet").unlink()
    (tmp_path / "out" / "_done" / "00000").write_bytes(b"")  # a bare marker names no run
    assert [out.is_done(i) for i in range(3)] == [False, False, False]


# ---------------------------------------------------------------------------------------------
# 2. Re-running a finished run


def test_rerun_of_a_finished_dedup_run_is_a_no_op(tmp_path: Path, urls: Path, cli) -> None:
    config = write_yaml(
        tmp_path / "p.yaml",
        {
            "input": {"path": str(urls), "url_col": "URL", "caption_col": "TEXT"},
            "output": {"path": "out", "rows_per_shard": 40},
            "workers": 1,
            "stages": [{"drop_word": {"word": "wallpaper"}}, "caption_dedup"],
        },
    )
    first = cli("run", config)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path / "out")
    again = cli("run", config)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert snapshot(tmp_path / "out") == before
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["finished"] and record["totals"]["rows_in"] == 120


# ---------------------------------------------------------------------------------------------
# Messages


def test_output_mistakes_are_one_line(tmp_path: Path, urls: Path, cli) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_usage_error(stage(cli, urls, a_file, *LAION), "is a file")
    assert_usage_error(stage(cli, urls, a_file / "out", *LAION), "cannot write to the output folder")
    assert_usage_error(stage(cli, urls, "/sys/mmcurate-test-out", *LAION), "cannot write to the output folder")
    assert a_file.read_text() == "x"


def test_corrupt_run_json_is_one_line_in_run_and_inspect(tmp_path: Path, urls: Path, cli) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"pipeline": ')
    assert_usage_error(stage(cli, urls, out, *LAION), "run.json is unreadable")
    assert_usage_error(cli("inspect", out), "run.json is unreadable")
    assert sorted_files(out) == ["run.json"] and (out / "run.json").read_text() == '{"pipeline": '


def test_same_value_given_by_set_is_the_same_pipeline(tmp_path: Path, urls: Path, cli) -> None:
    config = write_yaml(
        tmp_path / "p.yaml",
        {
            "input": {"path": str(urls), "url_col": "URL", "caption_col": "TEXT"},
            "output": {"path": "out", "rows_per_shard": 40},
            "workers": 1,
            "stages": [{"caption_quality": {"min_words": 3}}],
        },
    )
    assert cli("run", config).returncode == 0
    crash_state(tmp_path / "out")
    again = cli("run", config, "--set", "caption_quality.min_words=3")
    assert again.returncode == 0, again.stderr
    assert_usage_error(cli("run", config, "--set", "caption_quality.min_words=4"), "different pipeline")


def test_bad_stage_option_is_reported_before_the_pipeline_comparison(tmp_path: Path, urls: Path, cli) -> None:
    assert stage(cli, urls, tmp_path / "out", *LAION).returncode == 0
    assert_usage_error(stage(cli, urls, tmp_path / "out", *LAION, "--set", "mode=bogus"), "mode must be filter or score")


def test_relative_input_path_is_stored_resolved(tmp_path: Path, urls: Path, cli) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "urls.parquet").write_bytes(urls.read_bytes())
    first = stage(cli, "data/urls.parquet", "out", *SMALL, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["pipeline"]["input"]["path"] == str(tmp_path / "data" / "urls.parquet")
    crash_state(tmp_path / "out")
    (tmp_path / "out" / "_done" / "00001").unlink()
    again = stage(cli, "urls.parquet", "../out", *SMALL, cwd=tmp_path / "data")
    assert again.returncode == 0, again.stderr
    assert check_accounting(tmp_path / "out")["rows_in"] == 120


def test_setup_failure_writes_nothing(tmp_path: Path, urls: Path, cli) -> None:
    missing = stage(cli, tmp_path / "missing.csv", tmp_path / "out", *LAION)
    assert_usage_error(missing, "does not exist")
    (tmp_path / "in.csv").write_text("a,b\n1,2\n")  # parsed at planning (into the output's work folder)
    assert_usage_error(stage(cli, tmp_path / "in.csv", tmp_path / "out2", *LAION), "no url column")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------------------------------
# 8. validate fails incomplete output


def test_validate_fails_incomplete_output(tmp_path: Path, urls: Path, cli) -> None:
    out = tmp_path / "out"
    assert stage(cli, urls, out, *SMALL).returncode == 0
    assert cli("validate", out).stdout.strip() == "valid"
    crash_state(out)
    (out / "_done" / "00002").unlink()
    crashed = cli("validate", out)
    assert crashed.returncode == 1 and "not finished" in crashed.stdout and "_done/00002: missing" in crashed.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("validate", empty)
    assert result.returncode == 1 and "no dataset" in result.stdout
    (empty / "notes.txt").write_text("not a dataset\n")
    result = cli("validate", empty)
    assert result.returncode == 1 and "no dataset: not an mmcurate output (no run.json)" in result.stdout
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "run.json").write_text("{")
    result = cli("validate", corrupt)
    assert result.returncode == 1 and "run.json" in result.stdout


# ---------------------------------------------------------------------------------------------
# 9. Pool workers die with their parent


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_pool_workers_exit_when_the_main_process_is_killed(tmp_path: Path, urls: Path) -> None:
    config = write_yaml(
        tmp_path / "p.yaml",
        {
            "input": {"path": str(urls), "url_col": "URL", "caption_col": "TEXT"},
            "output": {"path": "out", "rows_per_shard": 10},
            "workers": 2,
            "stages": [{"slow": {"seconds": 1}}],
        },
    )
    proc = subprocess.Popen(toy_cli_command("run", str(config), "--no-progress"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while len(workers) < 2:  # the pool's workers, forked or spawned: every child but multiprocessing's resource tracker
        assert proc.poll() is None and time.monotonic() < deadline, "the pool did not start"
        workers = {c for c in _children(proc.pid) if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()}
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "pool workers outlived their killed parent"


# ---------------------------------------------------------------------------------------------
# Property: a run killed at any point and resumed gives the output of an uninterrupted run


KILL_STAGES = [{"drop_word": {"word": "wallpaper"}}, "caption_dedup", {"slow": {"seconds": 0}}]


@pytest.fixture(scope="module")
def kill_input(tmp_path_factory, laion_sample: Path) -> Path:
    """120 LAION rows as CSV (parsed into the output's work folder at planning), with duplicate captions."""
    return laion_csv_with_repeats(laion_sample, tmp_path_factory.mktemp("kill") / "urls.csv", 120)


def kill_pipeline(src: Path, out: Path, engine: str = "local") -> dict:
    return {
        "input": {"path": str(src), "url_col": "URL", "caption_col": "TEXT"},
        "output": {"path": str(out), "rows_per_shard": 30},
        "workers": 1 if engine == "local" else 2,
        "engine": engine,
        "stages": KILL_STAGES,
    }


def run_killed(config: Path, point: str) -> None:
    """Run ``config`` in a process that SIGKILLs itself at kill point ``point`` (``NAME:N``)."""
    env = {**os.environ, killpoints.ENV: point}
    command = toy_cli_command("run", str(config), "--no-progress")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr)


def test_resume_after_a_kill_anywhere_equals_the_uninterrupted_run(tmp_path: Path, kill_input: Path, monkeypatch) -> None:
    """Kill points drawn at random (fixed seed) over every pass of reading, stages, the global step
    and the file writes (input parse, run.json, intermediates, shards, markers) of the local engine."""
    register(monkeypatch)
    passes: Counter[str] = Counter()
    monkeypatch.setattr(killpoints, "reached", lambda name: passes.update([name]))
    whole = tmp_path / "whole"
    run_local(parse_pipeline(kill_pipeline(kill_input, whole)), progress=False)
    monkeypatch.undo()
    register(monkeypatch)
    assert {"read", "stage", "global", "write"} <= set(passes) and passes["global"] == 1
    rng = random.Random(15)
    points = ["read", "stage", "global", "write", "stage", *["write"] * 5]
    for i, point in enumerate(points):
        out = tmp_path / f"killed{i}"
        config = write_yaml(tmp_path / f"killed{i}.yaml", kill_pipeline(kill_input, out))
        run_killed(config, f"{point}:{rng.randint(1, passes[point])}")
        run_local(parse_pipeline(kill_pipeline(kill_input, out)), progress=False)
        assert_same_output(out, whole)


def test_a_run_killed_in_its_global_step_keeps_the_pieces_in_its_work_folder(tmp_path: Path, kill_input: Path, monkeypatch) -> None:
    """The pieces that pool workers pass in a global step are files in the output's ``_work/`` (not the
    system's temporary folder, where a kill -9 would leave them for good): the resume empties them and
    its finish removes them with the work folder."""
    register(monkeypatch)
    hold = tmp_path / "hold"
    hold.touch()
    out = tmp_path / "killed"
    pipeline = {**kill_pipeline(kill_input, out), "workers": 2, "stages": [{"caption_dedup": {"hold": str(hold)}}]}
    proc = subprocess.Popen(toy_cli_command("run", str(write_yaml(tmp_path / "p.yaml", pipeline)), "--no-progress"))
    pieces = out / "_work" / "pieces0"
    deadline = time.monotonic() + 60
    try:
        while not (pieces.is_dir() and any(pieces.iterdir())):  # verify holds: the pieces of the phases before it are there
            assert proc.poll() is None and time.monotonic() < deadline, "no pieces in the work folder"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    hold.unlink()
    whole = tmp_path / "whole"
    run_local(parse_pipeline({**pipeline, "output": {**pipeline["output"], "path": str(whole)}}), progress=False)
    run_local(parse_pipeline(pipeline), progress=False)
    assert_same_output(out, whole)
    assert not (out / "_work").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engine_run_killed_at_its_global_step_resumes(engine: str, tmp_path: Path, kill_input: Path, monkeypatch) -> None:
    """The driver killed after the first segment ran on the engine's workers; the state it leaves
    resumes (on the local engine, which shares the layout) to the uninterrupted run's files."""
    pytest.importorskip("ray" if engine == "ray" else "pyspark")
    register(monkeypatch)
    whole = tmp_path / "whole"
    run_local(parse_pipeline(kill_pipeline(kill_input, whole)), progress=False)
    out = tmp_path / "killed"
    run_killed(write_yaml(tmp_path / "killed.yaml", kill_pipeline(kill_input, out, engine)), "global:1")
    assert len(list((out / "_work" / "seg0").glob("*.arrow"))) == 4 and not (out / "_done").exists()
    run_local(parse_pipeline(kill_pipeline(kill_input, out)), progress=False)
    assert_same_output(out, whole)


def test_an_unfinished_or_damaged_output_is_no_dataset(tmp_path: Path, kill_input: Path, monkeypatch) -> None:
    """An output read as a whole (another run's input, an export) must be whole: a killed run's output is
    refused until its resume finishes it, and so is a finished one missing a file its done markers list."""
    register(monkeypatch)
    passes: Counter[str] = Counter()
    monkeypatch.setattr(killpoints, "reached", lambda name: passes.update([name]))
    run_local(parse_pipeline(kill_pipeline(kill_input, tmp_path / "whole")), progress=False)
    monkeypatch.undo()
    register(monkeypatch)
    out = tmp_path / "killed"
    run_killed(write_yaml(tmp_path / "killed.yaml", kill_pipeline(kill_input, out)), f"write:{passes['write'] // 2}")

    def reading(name: str) -> dict:
        return {"input": {"path": str(out)}, "output": {"path": str(tmp_path / name)}, "workers": 1, "stages": [{"slow": {"seconds": 0}}]}

    with pytest.raises(UsageError, match=r"unfinished run \(\d+ shard\(s\) done\): finish it"):
        run_local(parse_pipeline(reading("next")), progress=False)
    with pytest.raises(UsageError, match="unfinished run"):
        export("llava", str(out), str(tmp_path / "export"))
    build_report(str(out), str(tmp_path / "report.html"))  # a report shows the shards done so far, and says so
    assert "Unfinished run:" in (tmp_path / "report.html").read_text()
    run_local(parse_pipeline(kill_pipeline(kill_input, out)), progress=False)  # the resume finishes it
    run_local(parse_pipeline(reading("next")), progress=False)
    build_report(str(out), str(tmp_path / "report.html"))
    assert "Unfinished run:" not in (tmp_path / "report.html").read_text()
    assert check_accounting(tmp_path / "next")["rows_in"] == kept_table(out).num_rows > 0
    removed = sorted(((out / "meta") if (out / "meta").exists() else (out / "shards")).glob("*.parquet"))[1]
    removed.unlink()
    with pytest.raises(UsageError, match=f"{removed}: missing, though its shard's done marker lists it"):
        run_local(parse_pipeline(reading("third")), progress=False)
