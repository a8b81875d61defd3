"""Local, Ray and Spark runners give the same files per shard id: kept rows and columns, rejects
with reasons, stats (but timings); the Ray runner resumes a killed run. One local Ray and one
Spark session serve the whole module."""

from __future__ import annotations

import csv
import http.server
import shutil
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

ray = pytest.importorskip("ray")
pytest.importorskip("pyspark")

from mmcurate.engines.spark_runner import session
from mmcurate.shards.diff import diff_outputs

pytestmark = pytest.mark.slow

TEST_STAGES = [{"t_words": {"min_words": 5}}, "t_chars", "t_gpu", "t_dedup", "t_longest"]


@pytest.fixture(scope="module")
def ray_local():
    from mmcurate.engines.ray_runner import connect

    connect(2, object_store_memory=150 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def spark():
    spark, _ = session(2)
    yield spark
    spark.stop()


def _assert_same(reference: dict, other: dict, engine: str) -> None:
    assert sorted(other) == sorted(reference)
    for shard_id, expected in reference.items():
        assert other[shard_id] == expected, f"{engine}: shard {shard_id} differs"


def test_engines_agree_on_every_kind_of_stage(ray_local, spark, test_stages, caption_input, make_pipeline, run_and_read, capsys):
    """Per-row filter, stage with setup() (actor), GPU stage (its own pool: shards cross Ray
    operators), ClusterStage with verify, plain GlobalStage. Ray and Spark show the local runner's
    progress lines: per global step, and per stage when its segment ends."""
    summary, local = run_and_read(make_pipeline(caption_input, TEST_STAGES, "local"))
    stats = summary["stages"]
    assert stats["t_dedup"]["reasons"]["near_duplicate"] > 50
    assert stats["t_longest"]["rejected"] > 0 and stats["t_chars"]["rejected"] > 0
    capsys.readouterr()
    for engine in ("ray", "spark"):
        _, result = run_and_read(make_pipeline(caption_input, TEST_STAGES, engine, engine=engine), progress=True)
        _assert_same(local, result, engine)
        err = capsys.readouterr().err
        dedup = stats["t_dedup"]
        assert f"global step t_dedup: {dedup['rejected']} of {dedup['rows_in']} rows rejected in " in err, engine
        assert err.count(f"  t_chars: {stats['t_chars']['rows_in']} rows in, {stats['t_chars']['rejected']} rejected, ") == 1, engine


def test_engines_agree_on_two_stages_of_one_name(ray_local, spark, test_stages, caption_input, make_pipeline, run_and_read):
    """Two stages with setup() of one name and two global stages of one name: each is set up once per
    worker, keeps its own options and is named apart (``t_chars#1``...) in reject_stage and stats."""
    chars = [{"t_chars": {"word": "pizza"}}, {"t_chars": {"word": "dog"}}]
    stages = [*chars, {"t_words": {"min_words": 9}}, {"t_longest": {"fraction": 0.9}}, {"t_longest": {}}]
    summary, local = run_and_read(make_pipeline(caption_input, stages, "local"))
    found = {name: stage["reasons"] for name, stage in summary["stages"].items()}
    assert found["t_chars#1"].keys() == {"mentions_pizza"} and found["t_chars#2"].keys() == {"mentions_dog"}
    first, second = summary["stages"]["t_longest#1"], summary["stages"]["t_longest#2"]
    assert first["rows_in"] == summary["stages"]["t_words"]["rows_in"] - summary["stages"]["t_words"]["rejected"]
    assert first["rejected"] == first["rows_in"] - int(first["rows_in"] * 0.9)
    assert second["rows_in"] == first["rows_in"] - first["rejected"]
    assert second["rejected"] == second["rows_in"] - int(second["rows_in"] * 0.8)
    rejected_at = {r["reject_stage"] for shard in local.values() for r in shard["rejects"]}
    assert rejected_at == {"t_chars#1", "t_chars#2", "t_words", "t_longest#1", "t_longest#2"}
    for engine in ("ray", "spark"):
        _, result = run_and_read(make_pipeline(caption_input, stages, engine, engine=engine))
        _assert_same(local, result, engine)


def test_engines_agree_on_chained_dedups(ray_local, spark, test_stages, caption_input, make_pipeline, run_and_read):
    """A second dedup removes rows the first kept as the copy of others: every engine points those
    others on at the copy the second kept, so every duplicate_of names a kept row."""
    stages = [{"t_dedup": {"words": 4}}, {"t_dedup": {"words": 2}}]
    summary, local = run_and_read(make_pipeline(caption_input, stages, "local"))
    kept = {row["key"] for shard in local.values() for row in shard["kept"]}
    rejects = {row["key"]: row for shard in local.values() for row in shard["rejects"]}
    assert (
        summary["stages"]["t_dedup#2"]["rejected"] > 0 and {row["duplicate_of"] for row in rejects.values() if row["duplicate_of"]} <= kept
    )
    # A chain is there: a row the first dedup removed shares its first four words with one the second removed.
    first4 = {stage: {" ".join(row["caption"].lower().split()[:4]) for row in rejects.values() if row["reject_stage"] == stage}
              for stage in ("t_dedup#1", "t_dedup#2")}  # fmt: skip
    assert first4["t_dedup#1"] & first4["t_dedup#2"]
    for engine in ("ray", "spark"):
        _assert_same(local, run_and_read(make_pipeline(caption_input, stages, engine, engine=engine))[1], engine)


def test_ray_feeds_model_stages_pieces_of_shards(ray_local, test_stages, caption_input, make_pipeline, run_and_read):
    """Model stages on Ray get blocks of ``batch_size`` rows, not shards, and give the local runner's
    files (rows rejected before and after them in place, shards made whole again between two model
    stages); the one CPU model actor counts its out-of-memory halvings as the local model worker does."""
    model = {"device": "cpu", "batch_size": 32, "oom_above": 8}
    stages = [{"t_words": {"min_words": 9}}, {"t_model": model}, {"t_model": {**model, "oom_above": 32}}, {"t_words": {"min_words": 11}}]
    summaries, results = {}, {}
    for engine in ("local", "ray"):
        summaries[engine], results[engine] = run_and_read(make_pipeline(caption_input, stages, engine, engine=engine))
        for shard in results[engine].values():
            for row in shard["kept"] + shard["rejects"]:
                row.pop("model_pid"), row.pop("model_threads")  # where the model ran
            for entry in shard["stats"]["stages"]:
                entry.pop("oom_halvings", None)  # the shard the model worker met first counts them
    _assert_same(results["local"], results["ray"], "ray")
    halvings = [{name: summary["stages"][name]["oom_halvings"] for name in ("t_model#1", "t_model#2")} for summary in summaries.values()]
    assert halvings[0] == halvings[1] == {"t_model#1": 2, "t_model#2": 0}  # 32 rows, 16, then 8 per call


# --- the real stages, images downloaded from a local server -------------------------------------


@pytest.fixture(scope="module")
def photo_server(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Real photos on 127.0.0.1 (plus mirrored copies: other bytes, same subject); yields the URL
    list: each photo once, 8 byte-identical copies under other URLs, 8 mirrored photos with
    near-duplicate captions, 3 missing URLs and 3 junk captions."""
    root = tmp_path_factory.mktemp("served")
    with open(photo_dir / "manifest.csv", newline="") as f:
        photos = [
            (r["file"], r["caption_if_known"] or f"an unlabelled test photograph named {Path(r['file']).stem}") for r in csv.DictReader(f)
        ]
    for name, _ in photos:
        shutil.copy(photo_dir / name, root / name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [(f"{base}/{name}", caption) for name, caption in photos]
    rows += [(f"{base}/{name}?copy", f"copy number {i} of a photo seen elsewhere on the web") for i, (name, _) in enumerate(photos[:8])]
    for i, (name, caption) in enumerate(photos[8:16]):
        mirrored = f"mirrored_{i}.jpg"
        ImageOps.mirror(Image.open(photo_dir / name).convert("RGB")).save(root / mirrored, quality=90)
        rows.append((f"{base}/{mirrored}", caption.rstrip(".") + " ."))
    rows += [(f"{base}/missing_{i}.jpg", "a photo that is no longer on the server at all") for i in range(3)]
    rows += [(f"{base}/{photos[20 + i][0]}?junk", junk) for i, junk in enumerate(["IMG_1234.jpg", "untitled", "DSC01234"])]
    order = np.random.default_rng(1).permutation(len(rows))
    urls = root / "urls.parquet"
    pq.write_table(pa.table({"url": [rows[i][0] for i in order], "caption": [rows[i][1] for i in order]}), urls)
    yield urls
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


REAL_STAGES = [
    {"download": {"image_size": 64, "allow_private_networks": True, "retries": 0, "timeout": 5}},
    "caption_quality",
    {"language": {"mode": "score"}},
    "exact_dedup",
    {"minhash_dedup": {"threshold": 0.7}},
]


def test_engines_agree_on_a_real_pipeline(ray_local, spark, photo_server, make_pipeline, run_and_read, tmp_path):
    summary, local = run_and_read(make_pipeline(photo_server, REAL_STAGES, "local", rows_per_shard=20, format="webdataset"))
    reasons = {name: stage["reasons"] for name, stage in summary["stages"].items()}
    assert reasons["exact_dedup"].get("duplicate_image", 0) >= 8
    assert reasons["minhash_dedup"].get("duplicate_caption", 0) >= 6
    assert sum(reasons["download"].values()) >= 3 and sum(reasons["caption_quality"].values()) >= 3
    for engine in ("ray", "spark"):
        _, result = run_and_read(make_pipeline(photo_server, REAL_STAGES, engine, engine=engine, rows_per_shard=20, format="webdataset"))
        _assert_same(local, result, engine)
        assert diff_outputs(str(tmp_path / "local"), str(tmp_path / engine)) == []  # what `mmcurate diff` tells a user


@pytest.mark.parametrize("first", ["ray", "local"])
def test_ray_resumes_a_killed_run(first, ray_local, test_stages, caption_input, make_pipeline, run_and_read, tmp_path):
    """A run that dies in its second segment, after the global step, resumes on Ray to the output
    of an uninterrupted run, also when the killed run was the local runner's."""
    marker = tmp_path / "crash"
    marker.touch()
    stages = ["t_words", "t_dedup", {"t_crash": {"marker": str(marker)}}]
    with pytest.raises(Exception, match="simulated crash"):
        run_and_read(make_pipeline(caption_input, stages, "resumed", engine=first))
    assert 0 < len(list((tmp_path / "resumed" / "_done").iterdir())) < 9
    marker.unlink()
    _, resumed = run_and_read(make_pipeline(caption_input, stages, "resumed", engine="ray"))
    _, local = run_and_read(make_pipeline(caption_input, stages, "local"))
    _assert_same(local, resumed, "ray")


def test_ray_reruns_into_a_reused_output_folder(ray_local, test_stages, caption_input, make_pipeline, run_and_read, tmp_path):
    """Warm Ray workers keep a run's decisions; a new run into the same (emptied) folder must not
    see the previous run's."""
    smaller = tmp_path / "smaller.parquet"
    pq.write_table(pq.read_table(caption_input).slice(0, 450), smaller)
    stages = ["t_words", "t_dedup"]
    run_and_read(make_pipeline(caption_input, stages, "reused", engine="ray"))
    shutil.rmtree(tmp_path / "reused")
    _, second = run_and_read(make_pipeline(smaller, stages, "reused", engine="ray"))
    _, local = run_and_read(make_pipeline(smaller, stages, "local"))
    _assert_same(local, second, "ray")
