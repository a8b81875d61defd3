"""``mmcurate diff`` in bounded memory: outputs cut differently are compared bucket by bucket (spilled to
a temporary folder), shards cut alike side by side or, when their rows are not in step, by bucket; each
way finds the same differences, with the same examples, as comparing everything at once."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.cli import main
from mmcurate.shards import diff
from mmcurate.shards.diff import diff_outputs
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.writers import WebDatasetWriter, tar_bytes

CUT_DIFFERENTLY = [
    "run.json pipeline.output.rows_per_shard: 7 != 13",
    "run.json shards: 15 != 8",
    "shards: 15 in A, 8 in B (compared as whole datasets)",
]
# Whole (one bucket), and buckets of about 3 kB: some 20 of them, written in two passes of 4 files (FANOUT patched).
BUCKETS = [diff.BUCKET_BYTES, 3000]


@pytest.fixture(autouse=True)
def small_fanout(monkeypatch) -> None:
    monkeypatch.setattr(diff, "FANOUT", 4)


@pytest.fixture(scope="module")
def captions(tmp_path_factory, laion_sample: Path) -> Path:
    """100 LAION rows with a float column, ``score``."""
    table = pq.read_table(laion_sample).slice(0, 100)
    path = tmp_path_factory.mktemp("captions") / "captions.parquet"
    pq.write_table(table.append_column("score", pa.array([i / 7 for i in range(table.num_rows)])), path)
    return path


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, captions: Path) -> dict[int, Path]:
    """The captions curated twice, in shards of 7 and of 13 rows."""
    root = tmp_path_factory.mktemp("outputs")
    for n in (7, 13):
        options = ["--url-col", "URL", "--caption-col", "TEXT", "--rows-per-shard", str(n), "--no-progress"]
        assert main(["stage", "caption_quality", "--input", str(captions), "--output", str(root / str(n)), *options]) == 0
    return {n: root / str(n) for n in (7, 13)}


def copy(tmp_path: Path, src: Path) -> Path:
    shutil.copytree(src, tmp_path / "copy")
    return tmp_path / "copy"


def edit(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def set_value(table: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))


def key(path: Path, row: int) -> str:
    return pq.read_table(path).column("key")[row].as_py()


@pytest.mark.parametrize("bucket_bytes", BUCKETS)
def test_the_same_rows_cut_differently_agree(outputs: dict[int, Path], bucket_bytes: int) -> None:
    assert diff_outputs(str(outputs[7]), str(outputs[13]), bucket_bytes=bucket_bytes) == CUT_DIFFERENTLY


@pytest.mark.parametrize("bucket_bytes", BUCKETS)
def test_each_planted_difference_is_found_with_its_key(tmp_path: Path, outputs: dict[int, Path], bucket_bytes: int) -> None:
    b = copy(tmp_path, outputs[13])
    shard = b / "shards" / "00002.parquet"
    changed, missing, repeated = key(shard, 0), key(shard, 1), key(shard, 2)
    caption = pq.read_table(shard).column("caption")[0].as_py()
    edit(shard, lambda t: set_value(t, "caption", 0, "planted"))
    edit(shard, lambda t: pa.concat_tables([t.slice(0, 1), t.slice(2)]))  # the row of `missing` dropped
    edit(b / "shards" / "00005.parquet", lambda t: pa.concat_tables([t, pq.read_table(shard).slice(1, 1)]))  # `repeated`, again
    lines = diff_outputs(str(outputs[7]), str(b), bucket_bytes=bucket_bytes)
    assert lines == [
        *CUT_DIFFERENTLY,
        f"kept values differ in caption: 1 (e.g. {changed}: {diff._show(caption)} != 'planted')",
        f"rows only in A: 1 (e.g. {missing})",
        f"keys repeated in B: 1 (e.g. {repeated} (2 rows))",
    ]


@pytest.mark.parametrize("bucket_bytes", BUCKETS)
def test_shards_cut_alike_are_compared_by_key_in_or_out_of_step(tmp_path: Path, outputs: dict[int, Path], bucket_bytes: int) -> None:
    a, b = outputs[13], copy(tmp_path, outputs[13])
    shard = b / "shards" / "00003.parquet"
    edit(shard, lambda t: t.take(pa.array(range(t.num_rows - 1, -1, -1))))  # rows reversed: out of step
    assert diff_outputs(str(a), str(b), bucket_bytes=bucket_bytes) == []
    edit(shard, lambda t: set_value(t, "score", 2, -1.0))
    edit(b / "shards" / "00004.parquet", lambda t: pa.concat_tables([t, t.slice(0, 1)]))  # a key twice in one shard
    score = pq.read_table(a / "shards" / "00003.parquet").column("score")[-3].as_py()
    assert diff_outputs(str(a), str(b), bucket_bytes=bucket_bytes) == [
        f"kept values differ in score: 1 (e.g. {key(shard, 2)}: {score!r} != -1.0)",
        f"keys repeated in B: 1 (e.g. {key(shard.with_name('00004.parquet'), 0)} (2 rows))",
    ]


@pytest.mark.parametrize("bucket_bytes", [diff.BUCKET_BYTES, 200_000])
def test_a_changed_image_byte_is_found(tmp_path: Path, img2dataset_output: Path, bucket_bytes: int) -> None:
    """Whole, and in step (cut alike) or by buckets (cut differently)."""
    runs = {}
    for n in (4, 6):
        runs[n] = tmp_path / str(n)
        options = ["--output", str(runs[n]), "--rows-per-shard", str(n), "--no-progress"]
        assert main(["stage", "caption_quality", "--input", str(img2dataset_output), *options]) == 0
    b = copy(tmp_path, runs[6])
    out = OutputDir.open(str(b))
    rows = WebDatasetWriter().read(out, 1)
    images = rows.column("image").to_pylist()
    images[2] = images[2][:100] + bytes([images[2][100] ^ 1]) + images[2][101:]
    out.write_bytes(out.tar_path(1), tar_bytes(rows.set_column(rows.column_names.index("image"), "image", pa.array(images, pa.binary()))))
    expected = (
        f"kept values differ in image: 1 (e.g. {rows.column('key')[2].as_py()}: <{len(images[2])} bytes> != <{len(images[2])} bytes>)"
    )
    assert diff_outputs(str(runs[6]), str(b), bucket_bytes=bucket_bytes) == [expected]
    assert diff_outputs(str(runs[4]), str(b), bucket_bytes=bucket_bytes)[-1] == expected


def test_memory_stays_about_one_bucket(tmp_path: Path, laion_sample: Path, monkeypatch) -> None:
    """With buckets of a 32nd of the outputs (1,000 rows of 32 kB each, cut differently), the Arrow memory
    held while rows are spilled or compared stays under a third of that held comparing them whole (a
    shard's reader holds about twice a row group, here one of 25 or 35 rows, and each open bucket file about 100 kB)."""
    table = pq.read_table(laion_sample)
    wide = tmp_path / "wide.parquet"
    pq.write_table(table.append_column("blob", pa.array([os.urandom(32768) for _ in range(table.num_rows)])), wide)
    for n in (25, 35):
        options = ["--url-col", "URL", "--caption-col", "TEXT", "--rows-per-shard", str(n), "--no-progress"]
        assert main(["stage", "caption_quality", "--input", str(wide), "--output", str(tmp_path / str(n)), *options]) == 0
    peak = [0]

    def sampled(function: Callable) -> Callable:
        def call(*args, **kwargs):
            peak[0] = max(peak[0], pa.total_allocated_bytes())
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(diff, "_compare_values", sampled(diff._compare_values))
    chunks = diff._chunks
    monkeypatch.setattr(diff, "_chunks", lambda batches, nbytes: map(sampled(lambda chunk: chunk), chunks(batches, nbytes)))
    monkeypatch.setattr(diff, "FANOUT", 256)
    a, b = (str(tmp_path / str(n)) for n in (25, 35))
    size = sum(f.stat().st_size for path in (a, b) for f in Path(path).rglob("*.parquet"))
    peaks = {}
    for bucket_bytes in (diff.BUCKET_BYTES, size // 32):
        base, peak[0] = pa.total_allocated_bytes(), 0
        assert diff_outputs(a, b, bucket_bytes=bucket_bytes)[-1] == "shards: 40 in A, 29 in B (compared as whole datasets)"
        peaks[bucket_bytes] = peak[0] - base
    assert peaks[size // 32] < peaks[diff.BUCKET_BYTES] / 3, peaks


def test_spilled_buckets_are_removed_even_on_an_error(tmp_path: Path, outputs: dict[int, Path], monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(diff.tempfile, "tempdir", None)  # read TMPDIR again

    def fail(*args) -> None:
        assert any(tmp_path.glob("mmcurate-diff-*/kept0/*.parquet"))  # spilled there
        raise RuntimeError("planted")

    monkeypatch.setattr(diff, "_compare_bucket", fail)
    with pytest.raises(RuntimeError, match="planted"):
        diff_outputs(str(outputs[7]), str(outputs[13]), bucket_bytes=3000)
    assert os.listdir(tmp_path) == []
