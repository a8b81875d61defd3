"""The local runner: row accounting, global stages, resume after kill -9, refusing a foreign output."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.engines.local import run_local
from mmcurate.pipelines.config import Pipeline, StageSpec
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.readers import InputSpec, plan_input
from mmcurate.shards.writers import OutputSpec
from mmcurate.tests.support.foundation import (
    LAION,
    assert_same_output,
    assert_usage_error,
    check_accounting,
    kept_table,
    key_of,
    read_folder,
    register,
    run_cli,
    sorted_files,
    toy_cli_command,
    toy_stage,
    write_yaml,
)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def dup_csv(tmp_path_factory, laion_sample: Path) -> Path:
    """200 LAION rows where every 10th row repeats the caption of the row before it."""
    rows = pq.read_table(laion_sample, columns=["URL", "TEXT"]).slice(0, 200).to_pylist()
    for i in range(10, len(rows), 10):
        rows[i]["TEXT"] = rows[i - 1]["TEXT"]
    return write_csv(tmp_path_factory.mktemp("dup") / "urls.csv", rows)


def pipeline(
    src: Path, out: Path, stages: list[StageSpec], fmt: str = "webdataset", rows_per_shard: int = 40, workers: int = 1
) -> Pipeline:
    return Pipeline(
        InputSpec(str(src), url_col="URL", caption_col="TEXT"), OutputSpec(str(out), fmt, rows_per_shard), stages, workers=workers
    )


def test_accounting_with_filter_and_global_stage(tmp_path: Path, dup_csv: Path, monkeypatch) -> None:
    register(monkeypatch)
    stages = [StageSpec("drop_word", {"word": "wallpaper"}), StageSpec("caption_dedup"), StageSpec("drop_word", {"word": "the"})]
    summary = run_local(pipeline(dup_csv, tmp_path / "out", stages), progress=False)
    out = tmp_path / "out"
    totals = check_accounting(out)
    assert totals["rows_in"] == 200 and summary["rows_in"] == 200
    assert (summary["kept"], summary["rejected"]) == (totals["kept"], totals["rejected"])

    kept, rejects = kept_table(out), read_folder(out / "rejects")
    assert sorted(kept.column("key").to_pylist() + rejects.column("key").to_pylist()) == sorted(key_of("urls.csv", i) for i in range(200))
    assert kept.num_rows + rejects.num_rows == 200
    assert not any(c.startswith("_") for c in kept.column_names + rejects.column_names)
    by_stage = {(r["reject_stage"], r["reject_reason"]) for r in rejects.select(["reject_stage", "reject_reason"]).to_pylist()}
    assert by_stage == {("caption_dedup", "duplicate_caption"), ("drop_word#2", "has_word")}  # no caption holds "wallpaper"
    dups = [r for r in rejects.to_pylist() if r["reject_reason"] == "duplicate_caption"]
    everything = {r["key"]: r for r in kept.to_pylist() + rejects.to_pylist()}
    assert dups
    for d in dups:
        keeper = everything[d["duplicate_of"]]
        assert keeper["caption"] == d["caption"] and keeper["key"] < d["key"]
    # Kept captions are unique, and none holds a filtered word.
    captions = kept.column("caption").to_pylist()
    assert len(set(captions)) == len(captions)
    assert not any("wallpaper" in c.lower() or "the" in c.lower() for c in captions)
    # The stats name the same stages and reasons as the rejects.
    stats = summary["stages"]
    assert stats["caption_dedup"]["reasons"] == {"duplicate_caption": len(dups)}
    assert stats["drop_word#1"]["rejected"] + stats["drop_word#2"]["rejected"] == rejects.num_rows - len(dups)
    assert not (out / "_work").exists()


def test_progress_shows_each_stage_and_the_global_step(tmp_path: Path, dup_csv: Path, monkeypatch, capsys) -> None:
    register(monkeypatch)
    stages = [StageSpec("drop_word", {"word": "wallpaper"}), StageSpec("caption_dedup"), StageSpec("drop_word", {"word": "the"})]
    summary = run_local(pipeline(dup_csv, tmp_path / "out", stages), progress=True)
    err, stats = capsys.readouterr().err, summary["stages"]
    dedup = stats["caption_dedup"]
    assert f"global step caption_dedup: deciding over {dedup['rows_in']} rows" in err
    assert f"global step caption_dedup: {dedup['rejected']} of {dedup['rows_in']} rows rejected in " in err
    for label in ("read", "drop_word#1", "drop_word#2"):  # each line once, from the segment that runs the stage
        assert err.count(f"  {label}: {stats[label]['rows_in']} rows in, {stats[label]['rejected']} rejected, ") == 1


def test_pool_of_workers_writes_the_same_files_as_one_worker(tmp_path: Path, laion_sample: Path) -> None:
    """Real registered stages in a pool of 2 spawned workers, a dedup global step's phases among them
    (files between its processes), give the files of a single worker (which decides in the driver)."""
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        stages = [StageSpec("caption_quality"), StageSpec("minhash_dedup", {"threshold": 0.5})]
        run_local(pipeline(laion_sample, out, stages, rows_per_shard=250, workers=workers), progress=False)
        outs[workers] = out
    files = sorted_files(outs[1])
    assert files == sorted_files(outs[2]) and "shards/00003.tar" in files
    for name in files:
        if name != "run.json" and not name.startswith(("_stats", "_done")):
            assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name
    totals = check_accounting(outs[2])
    assert totals["rows_in"] == 1000 and 0 < totals["rejected"] < 1000


def resume_config(tmp_path: Path, src: Path, name: str) -> Path:
    return write_yaml(
        tmp_path / f"{name}.yaml",
        {
            "input": {"path": str(src), "url_col": "URL", "caption_col": "TEXT"},
            "output": {"path": str(tmp_path / name), "rows_per_shard": 20},
            "workers": 1,
            "stages": [{"drop_word": {"word": "wallpaper"}}, "caption_dedup", {"slow": {"seconds": 0.25}}],
        },
    )


@pytest.mark.slow
def test_resume_after_kill_9_equals_uninterrupted_run(tmp_path: Path, dup_csv: Path) -> None:
    killed = resume_config(tmp_path, dup_csv, "killed")
    proc = subprocess.Popen(toy_cli_command("run", str(killed), "--no-progress"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = tmp_path / "killed" / "_done"
    deadline = time.monotonic() + 60
    while not (done.exists() and any(done.iterdir())):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard finished in 60 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    finished = len(list(done.iterdir()))
    assert 1 <= finished < 10
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["finished"] is None

    again = run_cli("run", str(killed), "--no-progress", toy=True)
    assert again.returncode == 0, again.stderr
    whole = run_cli("run", str(resume_config(tmp_path, dup_csv, "whole")), "--no-progress", toy=True)
    assert whole.returncode == 0, whole.stderr
    assert_same_output(tmp_path / "killed", tmp_path / "whole")
    assert check_accounting(tmp_path / "killed")["rows_in"] == 200


def test_output_of_another_pipeline_is_refused(tmp_path: Path, dup_csv: Path) -> None:
    first = toy_stage("drop_word", dup_csv, tmp_path / "out", *LAION)
    assert first.returncode == 0, first.stderr
    before = {name: (tmp_path / "out" / name).read_bytes() for name in sorted_files(tmp_path / "out")}
    other = toy_stage("drop_word", dup_csv, tmp_path / "out", *LAION, "--set", "word=cat")
    assert_usage_error(other, "different pipeline")
    assert {name: (tmp_path / "out" / name).read_bytes() for name in sorted_files(tmp_path / "out")} == before
    # The same pipeline again is a finished run: nothing to do, same files.
    same = toy_stage("drop_word", dup_csv, tmp_path / "out", *LAION, "--workers", "2")
    assert same.returncode == 0, same.stderr
    after = {name: (tmp_path / "out" / name).read_bytes() for name in sorted_files(tmp_path / "out") if name != "run.json"}
    assert after == {k: v for k, v in before.items() if k != "run.json"}


def test_resume_removes_half_written_files(tmp_path: Path, laion_sample: Path) -> None:
    """The state kill -9 leaves in the middle of a shard's writes: files done, a temporary file, no marker."""
    whole, out = tmp_path / "whole", tmp_path / "out"
    run_local(pipeline(laion_sample, whole, [], rows_per_shard=400), progress=False)
    run_local(pipeline(laion_sample, out, [], rows_per_shard=400), progress=False)
    (out / "_done" / "00001").unlink()
    (out / "rejects" / "00001.parquet").unlink()
    (out / "rejects" / ".tmp-0123456789abcdef-00001.parquet").write_bytes(b"PAR1 half")
    (out / "meta" / "00001.parquet").write_bytes(b"stale")
    run_local(pipeline(laion_sample, out, [], rows_per_shard=400), progress=False)
    assert_same_output(out, whole)


def test_output_inside_the_input_folder_is_no_input(tmp_path: Path, laion_sample: Path) -> None:
    """A resumed run whose output lies in its input folder reads the same input, not its own files."""
    data = tmp_path / "data"
    data.mkdir()
    source = pq.read_table(laion_sample)
    pq.write_table(source.slice(0, 500), data / "a.parquet")
    pq.write_table(source.slice(500), data / "b.parquet")
    (data / "_SUCCESS.parquet").write_bytes(b"")  # a marker file, not input
    config = write_yaml(
        tmp_path / "p.yaml",
        {
            "input": {"path": "data", "url_col": "URL", "caption_col": "TEXT"},
            "output": {"path": "data/out", "rows_per_shard": 300},
            "workers": 1,
        },
    )
    assert run_cli("run", str(config), "--no-progress").returncode == 0
    (data / "out" / "_done" / "00003").unlink()
    again = run_cli("run", str(config), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert check_accounting(data / "out")["rows_in"] == 1000
    assert json.loads((data / "out" / "run.json").read_text())["shards"] == 4


def test_resume_refuses_a_changed_input(tmp_path: Path, dup_csv: Path) -> None:
    src = tmp_path / "urls.csv"
    src.write_bytes(dup_csv.read_bytes())
    args = ("drop_word", src, tmp_path / "out", *LAION, "--rows-per-shard", "50")
    assert toy_stage(*args).returncode == 0
    with open(src, "a") as f:
        f.write("".join(f"http://example.com/{i}.jpg,more rows {i}\n" for i in range(60)))
    assert_usage_error(toy_stage(*args), "input file urls.csv was changed")


def test_img2dataset_format_with_a_tar_without_its_parquet_is_an_error(tmp_path: Path, url_rows: list[dict]) -> None:
    folder = tmp_path / "lists"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(url_rows), folder / "00000.parquet")
    (folder / "unrelated.tar").write_bytes(b"")
    result = toy_stage("drop_word", folder, tmp_path / "out", "--input-format", "img2dataset")
    assert_usage_error(result, "unrelated.tar: an img2dataset tar without its Parquet file")
    # Without the format, a stray tar beside Parquet URL lists does not make the folder img2dataset output.
    reader = plan_input(InputSpec(str(folder), url_col="URL", caption_col="TEXT"), 100, OutputDir.open(str(tmp_path / "out2")))
    assert reader.format == "parquet" and reader.shards[0].rows == len(url_rows)
