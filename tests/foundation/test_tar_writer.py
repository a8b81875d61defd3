"""The column-wise tar writer against Python's tarfile, writers by name, shards streamed back in batches, the Parquet default for
rows without images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.errors import UsageError
from mmcurate.schemas import IMAGE_EXTENSIONS, NOT_IN_JSON
from mmcurate.shards.jsontext import dumps, finite
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.writers import WRITERS, OutputSpec, ParquetWriter, ShardWriter, WebDatasetWriter, split_kept, tar_bytes, write_tar
from mmcurate.tests.support.foundation import LAION, kept_table, toy_stage


def tarfile_bytes(table: pa.Table) -> bytes:
    """The same tar written member by member with tarfile and json.dumps (non-finite floats as null), as a reference."""
    buf = io.BytesIO()
    rows = table.select([c for c in table.column_names if c not in NOT_IN_JSON]).to_pylist()
    column = {
        name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
        for name in ("image", "image_format", "caption")
    }

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(table.column("key").to_pylist()):
            if column["image"][i] is not None:
                fmt = column["image_format"][i]
                add(tar, f"{key}.{fmt if fmt in IMAGE_EXTENSIONS else 'jpg'}", column["image"][i])
            add(tar, f"{key}.txt", (column["caption"][i] or "").encode())
            row = {k: None if isinstance(v, bytes) else v for k, v in rows[i].items()}
            add(tar, f"{key}.json", json.dumps(finite({"key": key, **row}), ensure_ascii=False, allow_nan=False).encode())
    return buf.getvalue()


ROWS = pa.table(
    {
        "key": ["000a", "000b", "000c", "000d", "000e"],
        "url": ['http://x.org/é"q\\', None, "tab\there\nnew line", "bell\x07 and \x1f unit", "plain"],
        "caption": ["un café", None, "x" * 700, "🙂 smile", ""],
        "image": pa.array([b"\xff\xd8" * 300, None, b"\x89PNG", b"", b"GIF89a"], pa.binary()),
        "image_format": ["jpg", None, "png", "webp", "gif"],
        "width": pa.array([640, None, -3, 0, 2**40], pa.int64()),
        "score": pa.array([0.5, None, 1.0, float("nan"), -0.0]),
        "big": pa.array([1e16, 1e-5, float("inf"), -float("inf"), 123456789.125]),
        "clip_score": pa.array([0.28, None, 1.0, 1e-7, 3e38], pa.float32()),
        "ok": [True, None, False, True, False],
        "tags": pa.array([["a", "b"], None, [], ["ü"], ["x"]], pa.list_(pa.string())),
        "scores": pa.array([[0.25, float("nan")], None, [float("inf")], [], [-float("inf"), 1e300]], pa.list_(pa.float64())),
        "exif": pa.array([b"raw", None, b"", b"x", None], pa.binary()),
        "reject_reason": pa.nulls(5, pa.string()),
    }
)


@pytest.mark.parametrize("columns", [None, ["key", "caption", "url", "reject_reason"], ["key", "url"]])
def test_tar_equals_the_one_tarfile_writes(columns: list[str] | None) -> None:
    table = ROWS if columns is None else ROWS.select(columns)
    assert tar_bytes(table) == tarfile_bytes(table)
    assert tar_bytes(table.slice(0, 0)) == tarfile_bytes(table.slice(0, 0))


def test_tar_of_a_shard_joined_from_pieces() -> None:
    """Chunked columns (a shard whose rows were processed in pieces), slices and large types: the same tar."""
    joined = pa.concat_tables([ROWS.slice(0, 2), ROWS.slice(2, 1), ROWS.slice(3)])
    large = joined.set_column(joined.column_names.index("image"), "image", joined.column("image").cast(pa.large_binary()))
    for table in (joined, large, ROWS.slice(1, 3)):
        assert tar_bytes(table) == tarfile_bytes(table)


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 256])
def test_a_tar_written_rows_at_a_time_is_the_same(rows: int) -> None:
    """write_tar builds the members a few rows at a time; the archive's end and padding come once, after all of them."""
    for table in (ROWS, ROWS.slice(0, 0), pa.concat_tables([ROWS] * 9)):
        f = io.BytesIO()
        write_tar(f, table, rows)
        assert f.getvalue() == tarfile_bytes(table)


def test_tar_reads_back_with_tarfile() -> None:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(ROWS))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members["000a.jpg"] == b"\xff\xd8" * 300 and members["000e.jpg"] == b"GIF89a" and "000b.jpg" not in members
    assert members["000d.webp"] == b"" and members["000c.txt"] == b"x" * 700 and members["000b.txt"] == b""
    record = json.loads(members["000d.json"])
    assert record["url"] == "bell\x07 and \x1f unit" and record["tags"] == ["ü"] and record["exif"] is None
    assert isinstance(json.loads(members["000c.json"])["score"], float)


def strict(text: str | bytes) -> object:
    """JSON as RFC 8259 has it: NaN and Infinity are not numbers."""

    def refuse(constant: str) -> None:
        raise ValueError(f"bare {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_members_write_null_for_nan_and_infinity() -> None:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(ROWS))) as tar:
        records = {m.name: strict(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")}
    assert [records[f"{k}.json"]["score"] for k in ROWS.column("key").to_pylist()] == [0.5, None, 1.0, None, -0.0]
    assert [records[f"{k}.json"]["big"] for k in ("000c", "000d", "000e")] == [None, None, 123456789.125]
    assert [r["scores"] for r in records.values()] == [[0.25, None], None, [None], [], [None, 1e300]]
    assert records["000a.json"]["clip_score"] == float(np.float32(0.28))


def test_dumps_is_json_dumps_but_for_nan_and_infinity() -> None:
    value = {"a": [1.5, float("nan"), {"b": (float("-inf"), "NaN")}], "c": float("inf"), "d": None}
    assert strict(dumps(value, sort_keys=True)) == {"a": [1.5, None, {"b": [None, "NaN"]}], "c": None, "d": None}
    assert dumps({"x": [0.1, "é"]}, ensure_ascii=False) == json.dumps({"x": [0.1, "é"]}, ensure_ascii=False)


def test_names_longer_than_ustar_allows_are_refused() -> None:
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        tar_bytes(pa.table({"key": ["k" * 97], "caption": ["c"]}))


def test_split_kept_keeps_row_order_and_shares_a_side_with_every_row() -> None:
    table = pa.table({"key": ["a", "b", "c"], "reject_reason": pa.array([None, "x", None], pa.string())})
    kept, rejected = split_kept(table)
    assert kept.column("key").to_pylist() == ["a", "c"] and rejected.column("key").to_pylist() == ["b"]
    none = table.set_column(1, "reject_reason", pa.nulls(3, pa.string()))
    assert split_kept(none)[0] is none and split_kept(none)[1].num_rows == 0
    every = table.set_column(1, "reject_reason", pa.array(["x"] * 3))
    assert split_kept(every)[0].num_rows == 0 and split_kept(every)[1] is every
    assert split_kept(table.slice(0, 0))[0].num_rows == 0


def test_writers_are_chosen_by_name() -> None:
    assert WRITERS == {"webdataset": WebDatasetWriter, "parquet": ParquetWriter}
    assert isinstance(OutputSpec("out", format="parquet").writer(), ParquetWriter)
    with pytest.raises(UsageError, match="webdataset, parquet"):
        OutputSpec("out", format="lance")
    assert OutputSpec("out").resolved(carries_images=True).format == "webdataset"
    assert OutputSpec("out").resolved(carries_images=False).format == "parquet"
    assert OutputSpec("out", format="webdataset").resolved(carries_images=False).format == "webdataset"


# ROWS as both writers read it back: no NaN (NaN != NaN), image formats a tar member's extension can hold.
SHARD = ROWS.drop_columns(["score", "scores"]).set_column(4, "image_format", pa.array(["jpg", None, "png", "webp", "png"]))


@pytest.mark.parametrize("writer", [WebDatasetWriter(), ParquetWriter()], ids=lambda w: w.name)
def test_shards_stream_back_in_batches_as_written(writer: ShardWriter, tmp_path: Path) -> None:
    """Batches of two rows across rows without an image or with an empty one; an empty shard is one empty table."""
    out = OutputDir.open(str(tmp_path))
    writer.write(out, 0, SHARD)
    batches = list(writer.batches(out, 0, rows=2))
    assert [b.num_rows for b in batches] == [2, 2, 1]
    whole = writer.read(out, 0)
    assert whole.select(SHARD.column_names).equals(SHARD) and pa.concat_tables(batches).equals(whole)
    writer.write(out, 1, SHARD.slice(0, 0))
    assert [b.num_rows for b in writer.batches(out, 1)] == [0] and writer.read(out, 1).num_rows == 0


def test_parquet_shards_are_written_in_row_groups_a_reader_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = OutputDir.open(str(tmp_path))
    monkeypatch.setattr(ParquetWriter, "row_group_bytes", 2 * SHARD.nbytes // 5 + 1)  # two rows a group
    ParquetWriter().write(out, 0, SHARD)
    assert pq.ParquetFile(out.parquet_path(0)).metadata.num_row_groups == 3
    assert ParquetWriter().read(out, 0).equals(SHARD)


def test_a_truncated_tar_is_a_usage_error_when_streamed(tmp_path: Path) -> None:
    out = OutputDir.open(str(tmp_path))
    WebDatasetWriter().write(out, 0, ROWS)
    data = (tmp_path / "shards" / "00000.tar").read_bytes()
    (tmp_path / "shards" / "00000.tar").write_bytes(data[:1000])  # inside the first image
    with pytest.raises(UsageError, match="00000.tar: not a readable tar"):
        list(WebDatasetWriter().batches(out, 0))


def test_rows_without_images_default_to_parquet_and_say_so(tmp_path: Path, laion_sample: Path, img2dataset_output: Path) -> None:
    captions = toy_stage("drop_word", laion_sample, tmp_path / "captions", *LAION, "--rows-per-shard", "400")
    assert captions.returncode == 0, captions.stderr
    assert "writing Parquet shards" in captions.stderr
    assert sorted(p.name for p in (tmp_path / "captions" / "shards").iterdir()) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert json.loads((tmp_path / "captions" / "run.json").read_text())["pipeline"]["output"]["format"] is None

    tars = toy_stage("drop_word", laion_sample, tmp_path / "tars", *LAION, "--rows-per-shard", "400", "--output-format", "webdataset")
    assert tars.returncode == 0 and "Parquet" not in tars.stderr
    assert len(list((tmp_path / "tars" / "shards").glob("*.tar"))) == 3
    assert kept_table(tmp_path / "tars").equals(kept_table(tmp_path / "captions"))

    images = toy_stage("drop_word", img2dataset_output, tmp_path / "images")
    assert images.returncode == 0 and "Parquet" not in images.stderr
    assert [p.name for p in (tmp_path / "images" / "shards").glob("*.tar")] == ["00000.tar"]


def test_an_unknown_output_format_is_a_usage_error(tmp_path: Path, laion_sample: Path) -> None:
    result = toy_stage("drop_word", laion_sample, tmp_path / "out", *LAION, "--output-format", "lance")
    assert result.returncode == 2 and "output format must be one of webdataset, parquet, not 'lance'" in result.stderr
