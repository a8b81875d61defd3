"""img2dataset output as input, and mmcurate output as input (chained runs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmcurate.shards.layout import OutputDir
from mmcurate.shards.readers import InputSpec, plan_input
from mmcurate.tests.support.foundation import check_accounting, kept_table, read_folder, run_cli, tables_equal
from mmcurate.tests.support.img2dataset_layout import I2D_ROWS, I2D_SHARDS


def test_img2dataset_reader_keeps_keys_rejects_failures_attaches_images(tmp_path: Path, img2dataset_output: Path, photo_dir: Path) -> None:
    reader = plan_input(InputSpec(str(img2dataset_output)), 4, OutputDir.open(str(tmp_path / "out")))
    assert reader.format == "img2dataset"
    assert [p.rows for p in reader.shards] == [4, 4, 4]  # 12 rows cut across the two files
    rows = [r for p in reader.shards for r in reader.read(p).to_pylist()]
    assert [r["key"] for r in rows] == [f"{s:05d}{i:04d}" for s in range(I2D_SHARDS) for i in range(I2D_ROWS)]
    for r in rows:
        source = pq.read_table(img2dataset_output / f"{r['key'][:5]}.parquet").to_pylist()[int(r["key"][5:])]
        assert (r["url"], r["caption"]) == (source["url"], source["caption"])
        assert r["error_message"] == source["error_message"] and r["exif"] == source["exif"]
        if source["status"] == "success":
            assert r["reject_reason"] is None and r["status"] == "ok"
            data = (photo_dir / source["url"].rsplit("/", 1)[1]).read_bytes()
            assert r["image"] == data and r["image_format"] == "jpg"
            assert r["sha256"] == hashlib.sha256(data).hexdigest()
            assert (r["width"], r["height"]) == (source["width"], source["height"])
        else:
            assert (r["reject_stage"], r["reject_reason"]) == ("read", "not_downloaded")
            assert r["status"] == "HTTP Error 404: Not Found" and r["image"] is None


def run_stage(tmp_path: Path, src: Path, name: str, fmt: str, *extra: str, stage: str = "drop_word") -> Path:
    """Run one toy stage through the CLI from ``src`` into ``tmp_path / name``."""
    args = [
        "stage",
        stage,
        "--input",
        str(src),
        "--output",
        str(tmp_path / name),
        "--output-format",
        fmt,
        "--workers",
        "1",
        "--no-progress",
    ]
    result = run_cli(*args, *extra, toy=True)
    assert result.returncode == 0, result.stderr
    return tmp_path / name


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_chained_runs(tmp_path: Path, img2dataset_output: Path, fmt: str) -> None:
    """img2dataset -> run 1 (rejects captions with 'a') -> run 2 (rejects 'with') on run 1's output."""
    first = run_stage(tmp_path, img2dataset_output, "first", fmt, "--set", "word=table")
    t1 = check_accounting(first)
    assert t1["rows_in"] == I2D_SHARDS * I2D_ROWS and t1["rejected"] > I2D_SHARDS  # the failed downloads and some captions
    kept1 = kept_table(first)
    assert kept1.column("image").null_count == 0 if fmt == "parquet" else "image" not in kept1.column_names

    second = run_stage(tmp_path, first, "second", fmt, "--set", "word=with")
    t2 = check_accounting(second)
    assert t2["rows_in"] == t1["kept"]
    rejects = read_folder(second / "rejects")
    assert set(rejects.column("reject_reason").to_pylist()) <= {"has_word"}
    assert set(rejects.column("reject_stage").to_pylist()) <= {"drop_word"}
    kept2 = kept_table(second)
    assert t2["kept"] == kept2.num_rows == sum("with" not in c.lower() for c in kept1.column("caption").to_pylist())
    # Keys and images survive the second run.
    images1 = image_bytes(first, fmt)
    images2 = image_bytes(second, fmt)
    assert set(images2) == set(kept2.column("key").to_pylist()) and all(images2[k] == images1[k] for k in images2)


def image_bytes(out: Path, fmt: str) -> dict[str, bytes]:
    if fmt == "parquet":
        t = kept_table(out)
        return dict(zip(t.column("key").to_pylist(), t.column("image").to_pylist(), strict=True))
    import tarfile

    found = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    found[m.name.split(".")[0]] = tar.extractfile(m).read()
    return found


def test_chaining_a_url_only_run_keeps_its_rows_and_scores(tmp_path: Path, laion_sample: Path) -> None:
    """A run without images (URL list in) chained into another: no row is taken for a missing image,
    and the first run's scores are carried through a stage that does not recompute them."""
    columns = ["--url-col", "URL", "--caption-col", "TEXT", "--rows-per-shard", "500"]
    first = run_stage(tmp_path, laion_sample, "first", "webdataset", *columns, "--set", "mode=score")
    second = run_stage(tmp_path, first, "second", "webdataset", "--set", "seconds=0", stage="slow")
    assert check_accounting(second)["kept"] == 1000
    a, b = kept_table(first), kept_table(second)
    assert tables_equal(a.select(["key", "url", "caption", "caption_words"]), b.select(["key", "url", "caption", "caption_words"]))
    assert a.column("caption_words").null_count == 0
