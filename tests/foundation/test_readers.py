"""URL-list readers: every format, configurable columns, deterministic keys, extra columns kept."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.errors import UsageError
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.readers import InputSpec, plan_input
from mmcurate.tests.support.foundation import LAION, check_accounting, kept_table, key_of, toy_stage


def write_url_list(path: Path, fmt: str, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts with the same keys) as a URL list of format ``fmt``."""
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text("".join(r["URL"] + "\n" for r in rows), encoding="utf-8")
    return path


def read_all(spec: InputSpec, out: Path, rows_per_shard: int = 1000) -> pa.Table:
    reader = plan_input(spec, rows_per_shard, OutputDir.open(str(out)))
    return pa.concat_tables([reader.read(p) for p in reader.shards], promote_options="permissive")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "txt"])
def test_url_list_formats(tmp_path: Path, url_rows: list[dict], fmt: str) -> None:
    rows = [{**r, "extra_id": f"id{i}"} for i, r in enumerate(url_rows)]
    src = write_url_list(tmp_path / f"urls.{fmt}", fmt, rows)
    spec = InputSpec(str(src), url_col="URL", caption_col=None if fmt == "txt" else "TEXT")
    table = read_all(spec, tmp_path / "out", rows_per_shard=15)

    assert table.column("url").to_pylist() == [r["URL"] for r in rows]
    if fmt == "txt":
        assert table.column("caption").null_count == len(rows)
    else:
        assert table.column("caption").to_pylist() == [r["TEXT"] for r in rows]
        assert table.column("extra_id").to_pylist() == [r["extra_id"] for r in rows]
        assert "URL" not in table.column_names and "TEXT" not in table.column_names
    assert table.column("key").to_pylist() == [key_of(src.name, i) for i in range(len(rows))]
    assert table.column("reject_reason").null_count == len(rows)


def test_format_detected_from_extension_and_forced(tmp_path: Path, url_rows: list[dict]) -> None:
    src = write_url_list(tmp_path / "urls.data", "jsonl", url_rows)
    with pytest.raises(UsageError, match="cannot tell the input format"):
        read_all(InputSpec(str(src), url_col="URL", caption_col="TEXT"), tmp_path / "o1")
    table = read_all(InputSpec(str(src), format="jsonl", url_col="URL", caption_col="TEXT"), tmp_path / "o2")
    assert table.num_rows == len(url_rows)


def test_keys_deterministic_across_runs_and_folders(tmp_path: Path, url_rows: list[dict]) -> None:
    """Keys depend on the path relative to the input root and the row, not on sharding or output."""
    root = tmp_path / "lists"
    (root / "part").mkdir(parents=True)
    write_url_list(root / "a.csv", "csv", url_rows[:10])
    write_url_list(root / "part" / "b.csv", "csv", url_rows[10:25])
    spec = InputSpec(str(root), url_col="URL", caption_col="TEXT")
    first = read_all(spec, tmp_path / "o1", rows_per_shard=4)
    second = read_all(spec, tmp_path / "o2", rows_per_shard=100)
    keys = first.column("key").to_pylist()
    assert keys == second.column("key").to_pylist()
    assert keys == [key_of("a.csv", i) for i in range(10)] + [key_of("part/b.csv", i) for i in range(15)]
    assert len(set(keys)) == len(keys)
    assert all(len(k) == 16 and "." not in k for k in keys)


def test_laion_sample_through_cli(tmp_path: Path, laion_sample: Path) -> None:
    """The real LAION sample (columns URL/TEXT) read by the console command, twice: same keys."""
    outs = []
    for name in ("a", "b"):
        result = toy_stage("drop_word", laion_sample, tmp_path / name, *LAION, "--rows-per-shard", "400", "--set", "word=wallpaper")
        assert result.returncode == 0, result.stderr
        assert "1000 rows in 3 shards" in result.stdout
        outs.append(tmp_path / name)
    totals = check_accounting(outs[0])
    assert totals["rows_in"] == 1000 and totals["rejected"] > 0
    kept = [kept_table(o) for o in outs]
    assert kept[0].column("key").equals(kept[1].column("key"))
    source = pq.read_table(laion_sample)
    expected = {
        key_of(laion_sample.name, i): (u, t)
        for i, (u, t) in enumerate(zip(source.column("URL").to_pylist(), source.column("TEXT").to_pylist(), strict=True))
    }
    for row in kept[0].select(["key", "url", "caption"]).to_pylist():
        assert expected[row["key"]] == (row["url"], row["caption"])
        assert "wallpaper" not in row["caption"].lower()


def test_extra_source_columns_carried_through_untouched(tmp_path: Path, url_rows: list[dict]) -> None:
    """Extra columns keep their values and Arrow types; names that clash with declared or internal columns are prefixed."""
    n = len(url_rows)
    table = pa.table(
        {
            "URL": [r["URL"] for r in url_rows],
            "TEXT": [r["TEXT"] for r in url_rows],
            "similarity": pa.array([i / 100 for i in range(n)], pa.float64()),
            "tags": pa.array([[f"t{i}", "x"] for i in range(n)], pa.list_(pa.string())),
            "status": [f"s{i}" for i in range(n)],  # clashes with a declared column
            "__index_level_0__": pa.array(range(n), pa.int64()),  # pandas index; a leading _ marks internal columns
        }
    )
    pq.write_table(table, tmp_path / "urls.parquet")
    result = toy_stage(
        "drop_word", tmp_path / "urls.parquet", tmp_path / "out", *LAION, "--output-format", "parquet", "--set", "mode=score"
    )
    assert result.returncode == 0, result.stderr
    out = kept_table(tmp_path / "out")
    assert out.num_rows == n
    assert out.column("similarity").equals(table.column("similarity"))
    assert out.column("tags").equals(table.column("tags"))
    assert out.column("source_status").to_pylist() == table.column("status").to_pylist()
    assert "status" not in out.column_names
    assert out.column("source___index_level_0__").to_pylist() == list(range(n))


def test_glob_inputs_key_by_path_below_the_wildcard(tmp_path: Path, url_rows: list[dict]) -> None:
    """Files of the same name in different folders get different keys, the same as for a folder input."""
    root = tmp_path / "lists"
    for i, part in enumerate(("a", "b")):
        (root / part).mkdir(parents=True)
        write_url_list(root / part / "urls.csv", "csv", url_rows[i * 5 : i * 5 + 5])
    expected = [key_of("a/urls.csv", i) for i in range(5)] + [key_of("b/urls.csv", i) for i in range(5)]
    for n, pattern in enumerate((f"{root}/*/urls.csv", f"{root}/**/*.csv", str(root))):
        table = read_all(InputSpec(pattern, url_col="URL", caption_col="TEXT"), tmp_path / f"out{n}")
        assert table.column("key").to_pylist() == expected, pattern
    with pytest.raises(UsageError, match="no files match"):
        read_all(InputSpec(f"{root}/*.tsv"), tmp_path / "none")


def test_shards_cut_across_parquet_row_groups(tmp_path: Path) -> None:
    """Shard boundaries inside row groups, and dictionary-encoded (pandas categorical) captions."""
    n = 40
    table = pa.table(
        {"url": [f"http://x/{i}.jpg" for i in range(n)], "caption": pa.array([f"c{i % 3}" for i in range(n)]).dictionary_encode()}
    )
    pq.write_table(table, tmp_path / "rg.parquet", row_group_size=7)
    reader = plan_input(InputSpec(str(tmp_path / "rg.parquet")), 15, OutputDir.open(str(tmp_path / "out")))
    assert [p.rows for p in reader.shards] == [15, 15, 10]
    out = pa.concat_tables([reader.read(p) for p in reader.shards])
    assert out.column("url").to_pylist() == table.column("url").to_pylist()
    assert out.column("caption").to_pylist() == [f"c{i % 3}" for i in range(n)]
    assert out.column("key").to_pylist() == [key_of("rg.parquet", i) for i in range(n)]


def test_a_carried_column_is_one_type_in_every_shard(tmp_path: Path) -> None:
    """A column that is int32 in one file, int64 in another and all nulls or absent elsewhere is
    int64 in every shard, its values unchanged; every shard has one schema."""
    root = tmp_path / "in"
    root.mkdir()
    pq.write_table(pa.table({"url": ["http://x/0.jpg", "http://x/1.jpg"], "n": pa.array([1, 2], pa.int32())}), root / "a.parquet")
    pq.write_table(pa.table({"url": ["http://x/2.jpg"], "n": pa.array([2**40], pa.int64()), "m": ["x"]}), root / "b.parquet")
    pq.write_table(pa.table({"url": ["http://x/3.jpg"], "n": pa.nulls(1)}), root / "c.parquet")
    reader = plan_input(InputSpec(str(root)), 1, OutputDir.open(str(tmp_path / "out")))
    shards = [reader.read(p) for p in reader.shards]
    assert len(shards) == 4 and all(s.schema.equals(shards[0].schema) for s in shards)
    assert (shards[0].schema.field("n").type, shards[0].schema.field("m").type) == (pa.int64(), pa.string())
    assert [v for s in shards for v in s.column("n").to_pylist()] == [1, 2, 2**40, None]
    assert [v for s in shards for v in s.column("m").to_pylist()] == [None, None, "x", None]


@pytest.mark.parametrize("other", [pa.array(["1"], pa.string()), pa.array([1], pa.uint64()), pa.array([1.5], pa.float64())])
def test_a_carried_column_of_two_types_without_a_common_one_is_refused(tmp_path: Path, other: pa.Array) -> None:
    """int64 and text, uint64 or float64 have no type that holds both without loss: one error names the column and both files."""
    root = tmp_path / "in"
    root.mkdir()
    pq.write_table(pa.table({"url": ["http://x/0.jpg"], "n": pa.array([1], pa.int64())}), root / "a.parquet")
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "n": other}), root / "b.parquet")
    with pytest.raises(UsageError, match=rf"column 'n' holds int64 in a.parquet but {other.type} in b.parquet"):
        plan_input(InputSpec(str(root)), 1, OutputDir.open(str(tmp_path / "out")))


def reasons_of(table: pa.Table) -> list[str | None]:
    return table.column("reject_reason").to_pylist()


def test_a_quote_left_open_rejects_its_line_and_swallows_no_rows(tmp_path: Path) -> None:
    """A quoted field may span lines (legal CSV); a quote that never closes properly is a malformed
    row of its own line, and the lines it would have swallowed are rows of their own."""
    text = (
        "url,caption\n"
        'http://a/0.jpg,"12 inch laptop\n'  # never closed: the file's next quote is followed by text
        "http://a/1.jpg,b\n"
        'http://a/2.jpg,"c" x\n'  # a quoting error within one line: read leniently, as before
        'http://a/3.jpg,"two\nlines"\n'  # legal: a line break inside a closed quote
        'http://a/4.jpg,"a\nb,c",d\n'  # closed, but the merged lines give three fields
        'http://a/6.jpg,"open to the end\n'
        "http://a/7.jpg,last\n"
    )
    (tmp_path / "q.csv").write_text(text, encoding="utf-8")
    table = read_all(InputSpec(str(tmp_path / "q.csv")), tmp_path / "out")
    assert table.column("url").to_pylist() == [f"http://a/{i}.jpg" for i in (0, 1, 2, 3, 4)] + ["b", "http://a/6.jpg", "http://a/7.jpg"]
    assert table.column("caption").to_pylist() == ["12 inch laptop\n", "b", "c x", "two\nlines", "a\n", 'c"', "open to the end\n", "last"]
    assert reasons_of(table) == ["malformed_row", None, None, None, "malformed_row", "malformed_row", "malformed_row", None]
    assert table.column("key").to_pylist() == [key_of("q.csv", i) for i in range(8)]


def test_a_csv_ending_inside_a_quote_is_a_malformed_row(tmp_path: Path) -> None:
    (tmp_path / "end.tsv").write_text('url\tcaption\nhttp://a/0.jpg\tfine\nhttp://a/1.jpg\t"cut off', encoding="utf-8")
    table = read_all(InputSpec(str(tmp_path / "end.tsv")), tmp_path / "out")
    assert table.column("caption").to_pylist() == ["fine", "cut off"]
    assert reasons_of(table) == [None, "malformed_row"]
    (tmp_path / "head.csv").write_text('url,"caption\nhttp://a/0.jpg,x\n', encoding="utf-8")
    with pytest.raises(UsageError, match="head.csv: the header row is malformed"):
        read_all(InputSpec(str(tmp_path / "head.csv")), tmp_path / "out2")


def test_lone_surrogates_in_jsonl_are_invalid_utf8(tmp_path: Path) -> None:
    """JSON may escape half a surrogate pair, which no UTF-8 text holds: the row is rejected, repaired for the ledger."""
    lines = [
        r'{"url": "http://a/0.jpg", "caption": "lone \ud800 high"}',
        r'{"url": "http://a/1.jpg", "caption": "half \ud83d emoji"}',
        r'{"url": "http://a/\udfff.jpg", "caption": "low in the url"}',
        r'{"url": "http://a/3.jpg", "caption": "a pair \ud83d\ude00 is fine"}',
        r'{"url": "http://a/4.jpg", "caption": "escaped byte \udc80"}',
        r'{"url": "http://a/5.jpg", "caption": "bad key", "k\ud800": "v"}',
        r'{"url": "http://a/6.jpg", "caption": "nested \ud800", "extra": ["\ud800"]}',
    ]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n", encoding="ascii")
    table = read_all(InputSpec(str(tmp_path / "s.jsonl")), tmp_path / "out")
    bad = "invalid_utf8"
    assert reasons_of(table) == [bad, bad, bad, None, bad, bad, bad]
    captions = table.column("caption").to_pylist()
    assert captions[:4] == ["lone \ufffd high", "half \ufffd emoji", "low in the url", "a pair \U0001f600 is fine"]
    assert table.column("url").to_pylist()[2] == "http://a/\ufffd.jpg"
    assert table.column_names == ["key", "url", "caption", "extra", "reject_stage", "reject_reason"]  # no column named by a bad key


def test_a_file_whose_name_holds_glob_characters_is_that_file(tmp_path: Path, url_rows: list[dict]) -> None:
    (tmp_path / "in").mkdir()
    src = write_url_list(tmp_path / "in" / "a[1].csv", "csv", url_rows[:3])
    write_url_list(tmp_path / "in" / "a1.csv", "csv", url_rows[3:9])  # what the pattern a[1].csv would match
    table = read_all(InputSpec(str(src), url_col="URL", caption_col="TEXT"), tmp_path / "out")
    assert table.column("key").to_pylist() == [key_of("a[1].csv", i) for i in range(3)]
    pattern = read_all(InputSpec(str(tmp_path / "in" / "a[0-9].csv"), url_col="URL", caption_col="TEXT"), tmp_path / "out2")
    assert pattern.num_rows == 6


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_input_path_is_refused(path: str) -> None:
    with pytest.raises(UsageError, match="the input path is empty"):
        InputSpec(path)
