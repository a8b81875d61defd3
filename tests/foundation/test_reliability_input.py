"""Reliability of the input side (issue 15): ingested images are verified like downloaded ones, tars
are read member by member, keys stay unique across merged img2dataset runs, a resume refuses a
changed input, and source columns with reserved names are carried, never obeyed."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcurate.cli import main
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.readers import InputSpec, plan_input
from mmcurate.tests.support.foundation import assert_usage_error, kept_table, read_folder, register, write_yaml
from mmcurate.tests.support.img2dataset_layout import write_img2dataset


@pytest.fixture
def cli(tmp_path: Path, capsys, monkeypatch):
    """``mmcurate ARGS`` in-process (toy stages registered), as a CompletedProcess."""
    register(monkeypatch)
    monkeypatch.chdir(tmp_path)

    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return call


def run_pipeline(cli, tmp_path: Path, src: Path, stages: list[dict], name: str = "out", **output) -> Path:
    out = tmp_path / name
    pipeline = write_yaml(
        tmp_path / f"{name}.yaml", {"input": {"path": str(src)}, "output": {"path": str(out), **output}, "workers": 1, "stages": stages}
    )
    result = cli("run", str(pipeline), "--no-progress")
    assert result.returncode == 0, result.stderr
    return out


def read_all(spec: InputSpec, out: Path, rows_per_shard: int = 1000) -> pa.Table:
    reader = plan_input(spec, rows_per_shard, OutputDir.open(str(out)))
    return pa.concat_tables([reader.read(p) for p in reader.shards], promote_options="permissive")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def tar_names(out: Path) -> list[str]:
    names = []
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            names += tar.getnames()
    return names


# ---------------------------------------------------------------------------------------------
# 3. Ingested images


def test_ingested_images_are_verified_like_downloaded_ones(tmp_path: Path, cli, jpeg_photos: list[dict], photo_dir: Path) -> None:
    photo = (photo_dir / jpeg_photos[0]["file"]).read_bytes()
    bad = {
        "000000000.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "000000001.jpg": png_header(30000, 30000),
        "000000002.jpg": photo[:500],
    }
    i2d = write_img2dataset(tmp_path / "i2d", jpeg_photos, photo_dir, shards=1, content=bad)
    out = run_pipeline(cli, tmp_path, i2d, [{"download": {}}, {"caption_quality": {"min_words": 1, "min_chars": 1}}, {"exact_dedup": {}}])
    rejects = {r["key"]: r for r in read_folder(out / "rejects").to_pylist()}
    expected = {"000000000": "not_an_image", "000000001": "decompression_bomb", "000000002": "decode_error"}
    for key, reason in expected.items():
        assert (rejects[key]["reject_stage"], rejects[key]["reject_reason"], rejects[key]["status"]) == ("read", reason, reason)
    kept = set(kept_table(out).column("key").to_pylist())
    assert not kept & set(expected)
    assert {n.split(".")[0] for n in tar_names(out)} == kept and kept  # the good photos are kept, in the tar


def test_an_image_member_over_the_cap_is_too_large_and_never_read(tmp_path: Path, jpeg_photos: list[dict], photo_dir: Path) -> None:
    photo = (photo_dir / jpeg_photos[1]["file"]).read_bytes()
    padded = photo + bytes(3_000_000)  # decodes fine, but 3 MB in the tar
    i2d = write_img2dataset(tmp_path / "i2d", jpeg_photos, photo_dir, shards=1, content={"000000001.jpg": padded})
    reader = plan_input(InputSpec(str(i2d), max_image_bytes=1_000_000), 1000, OutputDir.open(str(tmp_path / "out")))
    tracemalloc.start()
    try:
        table = reader.read(reader.shards[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rows = {r["key"]: r for r in table.to_pylist()}
    assert (rows["000000001"]["reject_reason"], rows["000000001"]["status"], rows["000000001"]["image"]) == ("too_large", "too_large", None)
    assert [rows[f"00000000{i}"]["reject_reason"] for i in (0, 2, 3, 4, 5)] == [None] * 4 + ["not_downloaded"]
    assert peak < 2_000_000, peak  # the 3 MB member was never read


def test_each_shard_reads_only_its_own_tar_members(tmp_path: Path, monkeypatch, img2dataset_output: Path) -> None:
    reader = plan_input(InputSpec(str(img2dataset_output)), 1, OutputDir.open(str(tmp_path / "out")))
    read_bytes = {"n": 0}
    real_open = reader.fs.open

    def counting_open(path, mode="rb", **kwargs):
        f = real_open(path, mode, **kwargs)
        if str(path).endswith(".tar"):
            real_read = f.read

            def read(*args):
                data = real_read(*args)
                read_bytes["n"] += len(data)
                return data

            f.read = read
        return f

    monkeypatch.setattr(reader.fs, "open", counting_open)
    rows = [r for plan in reader.shards for r in reader.read(plan).to_pylist()]
    assert sum(r["image"] is not None for r in rows) == 10
    tars = sum(p.stat().st_size for p in img2dataset_output.glob("*.tar"))
    assert read_bytes["n"] < 1.2 * tars, (read_bytes["n"], tars)  # not every tar once per shard (12 shards)


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def test_ingested_images_are_named_by_the_format_of_their_bytes(tmp_path: Path, cli, jpeg_photos: list[dict], photo_dir: Path) -> None:
    """A PNG stored as ``.jpg`` is ingested as png; an image of a format outputs do not store (GIF) is
    rejected as ``unsupported_format``: from an img2dataset tar, and from a Parquet shard whose
    ``image_format`` says otherwise. Every image comes back out as what it is."""
    i2d = write_img2dataset(
        tmp_path / "i2d", jpeg_photos, photo_dir, shards=1, content={"000000000.jpg": encoded("PNG"), "000000001.jpg": encoded("GIF")}
    )
    stages = [{"drop_word": {"word": "no such word"}}]
    first = run_pipeline(cli, tmp_path, i2d, stages, "first", format="parquet")
    rejects = {r["key"]: r for r in read_folder(first / "rejects").to_pylist()}
    assert (rejects["000000001"]["reject_reason"], rejects["000000001"]["status"]) == ("unsupported_format", "unsupported_format")
    kept = kept_table(first)
    formats = dict(zip(kept.column("key").to_pylist(), kept.column("image_format").to_pylist(), strict=True))
    assert formats == {"000000000": "png", "000000002": "jpg", "000000003": "jpg", "000000004": "jpg"}

    shard = first / "shards" / "00000.parquet"  # as a user might write one: a JPEG called gif, a GIF
    table = pq.read_table(shard)
    rows = table.column("key").to_pylist()
    named = pa.array(
        ["gif" if k in ("000000002", "000000003") else f for k, f in zip(rows, table.column("image_format").to_pylist(), strict=True)]
    )
    images = pa.array([encoded("GIF") if k == "000000003" else d for k, d in zip(rows, table.column("image").to_pylist(), strict=True)])
    table = table.set_column(table.column_names.index("image_format"), "image_format", named)
    pq.write_table(table.set_column(table.column_names.index("image"), "image", images), shard)
    second = run_pipeline(cli, tmp_path, first, stages, "second", format="webdataset")
    assert read_folder(second / "rejects").column("reject_reason").to_pylist() == ["unsupported_format"]
    assert sorted(n for n in tar_names(second) if not n.endswith((".txt", ".json"))) == ["000000000.png", "000000002.jpg", "000000004.jpg"]
    meta = kept_table(second)
    assert dict(zip(meta.column("key").to_pylist(), meta.column("image_format").to_pylist(), strict=True)) == {
        "000000000": "png",
        "000000002": "jpg",
        "000000004": "jpg",
    }


# ---------------------------------------------------------------------------------------------
# 4. Merged img2dataset runs


@pytest.mark.parametrize("rows_per_shard", [6, 12])
def test_merged_img2dataset_runs_get_keys_of_their_own(
    tmp_path: Path, cli, jpeg_photos: list[dict], photo_dir: Path, rows_per_shard: int
) -> None:
    """Two img2dataset runs of the same photos in one input: both use keys 000000000...; the second run's
    images are exact duplicates of the first's."""
    for run in ("run1", "run.2"):
        write_img2dataset(tmp_path / "in" / run, jpeg_photos, photo_dir, shards=1)
    out = run_pipeline(cli, tmp_path, tmp_path / "in", [{"exact_dedup": {}}], rows_per_shard=rows_per_shard)
    kept = kept_table(out).column("key").to_pylist()
    rejects = read_folder(out / "rejects").to_pylist()
    assert sorted(kept) == [f"run1_00000000{i}" for i in range(5)]
    dupes = {r["key"]: r["duplicate_of"] for r in rejects if r["reject_reason"] == "duplicate_image"}
    assert dupes == {f"run_2_00000000{i}": f"run1_00000000{i}" for i in range(5)}
    assert sorted(r["key"] for r in rejects if r["reject_reason"] == "not_downloaded") == ["run1_000000005", "run_2_000000005"]
    names = tar_names(out)
    assert len(names) == len(set(names)) == 3 * len(kept)


def test_a_key_repeated_within_a_shard_is_rejected_not_written_twice(tmp_path: Path, cli, jpeg_photos: list[dict], photo_dir: Path) -> None:
    i2d = write_img2dataset(tmp_path / "in", jpeg_photos, photo_dir, shards=1)
    for ext in ("parquet", "tar"):  # a copy of the shard beside it: the same keys in one folder
        (i2d / f"00001.{ext}").write_bytes((i2d / f"00000.{ext}").read_bytes())
    out = run_pipeline(cli, tmp_path, i2d, [{"drop_word": {"word": "zzz"}}])
    rejects = read_folder(out / "rejects").to_pylist()
    assert sorted(r["reject_reason"] for r in rejects) == ["duplicate_key"] * 5 + ["not_downloaded"] * 2
    names = tar_names(out)
    assert len(names) == len(set(names)) == 3 * 5


# ---------------------------------------------------------------------------------------------
# 5. A changed input on resume


def url_list(n: int) -> list[dict]:
    return [{"url": f"http://img.invalid/{i}.jpg", "caption": "boom" if i == 5 else f"photo number {i}"} for i in range(n)]


def write_urls(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        path.write_text("url,caption\n" + "".join(f"{r['url']},{r['caption']}\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("name, change", [("urls.csv", "grown"), ("urls.parquet", "edited")])
def test_a_resume_refuses_a_changed_input(tmp_path: Path, cli, name: str, change: str) -> None:
    src = tmp_path / name
    write_urls(src, url_list(10))
    pipeline = write_yaml(
        tmp_path / "p.yaml",
        {
            "input": {"path": str(src)},
            "output": {"path": str(tmp_path / "out"), "rows_per_shard": 4},
            "workers": 1,
            "stages": [{"boom": {}}],
        },
    )
    assert cli("run", str(pipeline), "--no-progress").returncode == 1  # shard 1 holds "boom": the run stops part-way
    assert cli("run", str(pipeline), "--no-progress").returncode == 1  # the same input resumes (and fails the same way)
    rows = url_list(30) if change == "grown" else [{**r, "caption": r["caption"] + "!"} for r in url_list(10)]
    write_urls(src, rows)
    assert_usage_error(cli("run", str(pipeline), "--no-progress"), name, "changed")


@pytest.mark.parametrize("name", ["urls.csv", "urls.parquet"])
def test_a_rerun_of_a_finished_run_refuses_a_changed_input(tmp_path: Path, cli, name: str) -> None:
    """The input's identities live in run.json, which outlives the work folder a finished run removes:
    an edited input of the same shard count is refused, and the output is left as it was."""
    src = tmp_path / name
    write_urls(src, url_list(10))
    pipeline = write_yaml(
        tmp_path / "p.yaml",
        {"input": {"path": str(src)}, "output": {"path": str(tmp_path / "out"), "rows_per_shard": 4}, "stages": [{"drop_word": {}}]},
    )
    assert cli("run", str(pipeline), "--no-progress").returncode == 0
    out = tmp_path / "out"
    assert not (out / "_work").exists() and set(json.loads((out / "run.json").read_text())["sources"]) == {name}
    assert cli("run", str(pipeline), "--no-progress").returncode == 0  # the same input: nothing to do
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_urls(src, [{**r, "caption": r["caption"].upper()} for r in url_list(10)])  # same rows and shards, other captions
    assert_usage_error(cli("run", str(pipeline), "--no-progress"), f"input file {name} was changed", str(out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------------
# 7. Source columns with reserved names


RESERVED = ("reject_reason", "reject_stage", "key", "status", "_hidden")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_reserved_source_columns_are_carried_as_source_columns(tmp_path: Path, fmt: str) -> None:
    values = list(range(4)) if fmt == "parquet" else [f"v{i}" for i in range(4)]  # integers in Parquet
    rows = [{"url": f"http://img.invalid/{i}.jpg", "caption": f"photo number {i}", **dict.fromkeys(RESERVED, values[i])} for i in range(4)]
    src = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), src)
    elif fmt == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        src.write_text("".join(sep.join(str(v) for v in r.values()) + "\n" for r in [dict(zip(rows[0], rows[0], strict=True)), *rows]))
    table = read_all(InputSpec(str(src)), tmp_path / "out")
    assert table.column("reject_reason").null_count == 4 and table.column("reject_stage").null_count == 4
    for name in RESERVED:
        assert table.column(f"source_{name}").to_pylist() == values, name
    assert table.column("key").to_pylist() != values


def test_reserved_columns_of_img2dataset_and_mmcurate_input(tmp_path: Path, cli, jpeg_photos: list[dict], photo_dir: Path) -> None:
    i2d = write_img2dataset(tmp_path / "i2d", jpeg_photos, photo_dir, shards=1)
    table = pq.read_table(i2d / "00000.parquet")
    pq.write_table(table.append_column("reject_reason", pa.array([7] * table.num_rows)), i2d / "00000.parquet")
    first = run_pipeline(cli, tmp_path, i2d, [{"drop_word": {"word": "zzz"}}], name="first")
    assert [r["reject_reason"] for r in read_folder(first / "rejects").to_pylist()] == ["not_downloaded"]
    assert kept_table(first).column("source_reject_reason").to_pylist() == [7] * 5
    second = run_pipeline(cli, tmp_path, first, [{"drop_word": {"word": "zzz"}}], name="second")
    assert kept_table(second).column("source_reject_reason").to_pylist() == [7] * 5


def test_duplicate_column_names_are_refused(tmp_path: Path, cli) -> None:
    (tmp_path / "urls.csv").write_text("url,caption,url\nhttp://a.invalid/1.jpg,a cat,http://b.invalid/1.jpg\n")
    assert_usage_error(
        cli("stage", "drop_word", "--input", str(tmp_path / "urls.csv"), "--output", str(tmp_path / "o1")), "urls.csv", "'url'", "twice"
    )
    table = pa.Table.from_arrays(
        [pa.array(["http://a.invalid/1.jpg"]), pa.array(["a cat"]), pa.array(["a dog"])], names=["url", "caption", "caption"]
    )
    pq.write_table(table, tmp_path / "urls.parquet")
    assert_usage_error(
        cli("stage", "drop_word", "--input", str(tmp_path / "urls.parquet"), "--output", str(tmp_path / "o2")), "'caption'", "twice"
    )
    rows = pa.Table.from_arrays(
        [pa.array(["http://a.invalid/1.jpg"]), pa.array(["x"]), pa.array(["y"])], names=["url", "key", "source_key"]
    )
    pq.write_table(rows, tmp_path / "clash.parquet")
    assert_usage_error(
        cli("stage", "drop_word", "--input", str(tmp_path / "clash.parquet"), "--output", str(tmp_path / "o3")), "source_key"
    )


# ---------------------------------------------------------------------------------------------
# Messages: malformed img2dataset Parquet


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda t: t.drop_columns(["key"]), ("00000.parquet", "no key column")),
        (lambda t: t.set_column(t.column_names.index("width"), "width", pa.array(["wide"] * t.num_rows)), ("00000.parquet", "width")),
    ],
)
def test_malformed_img2dataset_parquet_is_one_line(tmp_path: Path, cli, jpeg_photos: list[dict], photo_dir: Path, edit, fragments) -> None:
    i2d = write_img2dataset(tmp_path / "i2d", jpeg_photos, photo_dir, shards=1)
    pq.write_table(edit(pq.read_table(i2d / "00000.parquet")), i2d / "00000.parquet")
    assert_usage_error(cli("stage", "drop_word", "--input", str(i2d), "--output", str(tmp_path / "out")), *fragments)


def test_img2dataset_sizes_written_as_floats_with_nan(tmp_path: Path, jpeg_photos: list[dict], photo_dir: Path) -> None:
    """pandas writes an integer column with missing values as float64 with NaN."""
    i2d = write_img2dataset(tmp_path / "i2d", jpeg_photos, photo_dir, shards=1)
    table = pq.read_table(i2d / "00000.parquet")
    widths = table.column("width").to_pylist()
    floats = pa.array([float("nan") if w is None else float(w) for w in widths])
    pq.write_table(table.set_column(table.column_names.index("width"), "width", floats), i2d / "00000.parquet")
    assert read_all(InputSpec(str(i2d)), tmp_path / "out").column("width").to_pylist() == widths
