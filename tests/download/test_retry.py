"""``mmcurate run --retry-failed``: only failed downloads are fetched again and merged into the shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from mmcurate.cli import main
from mmcurate.tests.support.foundation import hold


def _pipeline(tmp_path, fmt: str, name: str = "pipeline.yaml", downloads: int = 1, **download) -> str:
    """A pipeline of ``downloads`` download stages with these options."""
    options = ", ".join(
        f"{k}: {v}" for k, v in {"image_size": 64, "deadline": 2, "retries": 0, "allow_private_networks": "true", **download}.items()
    )
    path = tmp_path / name
    path.write_text(
        f"input: {{path: urls.parquet}}\noutput: {{path: out, format: {fmt}, rows_per_shard: 3}}\n"
        f"workers: 1\nstages:\n" + f"  - download: {{{options}}}\n" * downloads
    )
    return str(path)


def _rejects(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet"))])


def test_retry_failed_fetches_only_failures_and_merges_them(server, tmp_path):
    paths = ["/img/jpeg", "/flaky/404/1/r1", "/status/500", "/flaky/503/1/r2", "/img/png"]
    urls = [server.url(p) for p in paths] + ["ftp://127.0.0.1/x.jpg"]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "urls.parquet")
    pipeline = _pipeline(tmp_path, "webdataset")
    out = tmp_path / "out"

    assert main(["run", pipeline, "--no-progress"]) == 0
    assert Counter(_rejects(out).column("reject_reason").to_pylist()) == {"http_404": 1, "http_500": 1, "http_503": 1, "bad_scheme": 1}
    hits = Counter(server.hits)

    assert main(["run", _pipeline(tmp_path, "webdataset", "retry.yaml", deadline=3), "--retry-failed", "--no-progress"]) == 0
    # the two flaky URLs and the 500 were fetched once more; nothing else was
    assert {p: server.hits[p] - hits[p] for p in paths} == {
        "/img/jpeg": 0,
        "/flaky/404/1/r1": 1,
        "/status/500": 1,
        "/flaky/503/1/r2": 1,
        "/img/png": 0,
    }
    rejects = _rejects(out)
    assert Counter(rejects.column("reject_reason").to_pylist()) == {"http_500": 1, "bad_scheme": 1}
    samples = list(
        wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False).decode("pil").to_tuple("jpg", "json")
    )
    assert sorted(meta["url"] for _, meta in samples) == sorted(
        server.url(p) for p in ("/img/jpeg", "/flaky/404/1/r1", "/flaky/503/1/r2", "/img/png")
    )
    assert all(min(image.size) == 64 for image, _ in samples)
    assert len(samples) + rejects.num_rows == len(urls)

    summary = {}
    for path in sorted((out / "_stats").glob("*.json")):
        stats = json.loads(path.read_text())
        assert stats["rows_in"] == stats["kept"] + stats["rejected"]
        summary.update({k: summary.get(k, 0) + stats[k] for k in ("rows_in", "kept", "rejected")})
    assert summary == {"rows_in": 6, "kept": 4, "rejected": 2}
    run = json.loads((out / "run.json").read_text())
    assert run["totals"] == summary and run["retries"][0]["retried"] == 3 and run["retries"][0]["recovered"] == 2


def test_retry_failed_keeps_parquet_output_and_refuses_other_pipelines(server, tmp_path, capsys):
    urls = [server.url("/flaky/404/1/p1"), server.url("/img/jpeg")]
    pq.write_table(pa.table({"url": urls, "caption": ["a", "b"]}), tmp_path / "urls.parquet")
    pipeline = _pipeline(tmp_path, "parquet")
    assert main(["run", pipeline, "--retry-failed", "--no-progress"]) == 2  # nothing to retry yet
    assert main(["run", pipeline, "--no-progress"]) == 0
    assert main(["run", _pipeline(tmp_path, "webdataset", "other.yaml"), "--retry-failed", "--no-progress"]) == 2
    assert "different pipeline" in capsys.readouterr().err
    assert main(["run", pipeline, "--retry-failed", "--no-progress"]) == 0
    kept = pq.read_table(tmp_path / "out" / "shards" / "00000.parquet")
    assert kept.column("status").to_pylist() == ["ok", "ok"] and all(kept.column("image").to_pylist())
    assert _rejects(tmp_path / "out").num_rows == 0


def test_breaker_refusals_are_in_the_stats_and_retried(server, other_host, tmp_path):
    trickle = other_host.url("/trickle")
    urls = [trickle] * 3 + [other_host.url("/img/jpeg"), server.url("/img/jpeg"), server.url("/img/png")]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "urls.parquet")
    slow = {"deadline": 20, "min_speed": 100, "min_speed_window": 1, "breaker_failures": 2}
    out = tmp_path / "out"
    assert main(["run", _pipeline(tmp_path, "webdataset", per_host_connections=1, **slow), "--no-progress"]) == 0
    assert Counter(_rejects(out).column("reject_reason").to_pylist()) == {"too_slow": 2, "host_unresponsive": 2}
    for shard in ("00000", "00001"):  # the host paused in the first shard stays paused in the second
        download = next(s for s in json.loads((out / "_stats" / f"{shard}.json").read_text())["stages"] if s["stage"] == "download")
        assert download["hosts_tripped"] == ["127.0.0.2"]

    before = other_host.hits["/trickle"]
    retry = _pipeline(tmp_path, "webdataset", "retry.yaml", per_host_connections=1, **{**slow, "breaker_failures": 0})
    assert main(["run", retry, "--retry-failed", "--no-progress"]) == 0
    assert other_host.hits["/trickle"] == before + 3
    assert Counter(_rejects(out).column("reject_reason").to_pylist()) == {"too_slow": 3}


def test_retry_failed_finds_every_download_stage_and_holds_the_lease(server, tmp_path, capsys):
    """Rows rejected at ``download#1`` of two download stages are retried; a live lease on the output
    (another run writing it) refuses the retry, with nothing fetched or changed."""
    urls = [server.url("/flaky/404/1/d1"), server.url("/img/jpeg")]
    pq.write_table(pa.table({"url": urls, "caption": ["a", "b"]}), tmp_path / "urls.parquet")
    pipeline = _pipeline(tmp_path, "parquet", downloads=2)
    out = tmp_path / "out"
    assert main(["run", pipeline, "--no-progress"]) == 0
    rejected = _rejects(out).select(["reject_stage", "reject_reason"]).to_pylist()
    assert rejected == [{"reject_stage": "download#1", "reject_reason": "http_404"}]

    hold(str(out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    hits = server.hits["/flaky/404/1/d1"]
    capsys.readouterr()
    assert main(["run", pipeline, "--retry-failed", "--no-progress"]) == 2
    assert "another run" in capsys.readouterr().err
    assert server.hits["/flaky/404/1/d1"] == hits and {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    (out / "_lease.json").unlink()
    assert main(["run", pipeline, "--retry-failed", "--no-progress"]) == 0
    assert server.hits["/flaky/404/1/d1"] == hits + 1 and _rejects(out).num_rows == 0
    assert sorted(pq.read_table(out / "shards" / "00000.parquet").column("url").to_pylist()) == sorted(urls)
    run = json.loads((out / "run.json").read_text())
    assert len(run["retries"][0]["download"]) == 2 and run["retries"][0]["recovered"] == 1
    assert not (out / "_lease.json").exists()


def test_retry_failed_works_in_its_own_work_folder_only(server, tmp_path, capsys):
    """A retry parses a URL list into the work folder it marks and removes; a ``_work`` that mmcurate did not
    write refuses it, kept as it is."""
    (tmp_path / "urls.csv").write_text(f"url,caption\n{server.url('/flaky/404/1/w1')},a\n{server.url('/img/jpeg')},b\n")
    pipeline = _pipeline(tmp_path, "parquet")
    Path(pipeline).write_text(Path(pipeline).read_text().replace("urls.parquet", "urls.csv"))
    out = tmp_path / "out"
    assert main(["run", pipeline, "--no-progress"]) == 0
    (out / "_work").mkdir()
    (out / "_work" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["run", pipeline, "--retry-failed", "--no-progress"]) == 2
    assert "_work holds files mmcurate did not write" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "_work").iterdir()) == ["notes.txt"] and _rejects(out).num_rows == 1
    (out / "_work" / "notes.txt").unlink()
    (out / "_work").rmdir()
    assert main(["run", pipeline, "--retry-failed", "--no-progress"]) == 0
    assert _rejects(out).num_rows == 0 and not (out / "_work").exists() and not (out / "_lease.json").exists()
