"""Bad input: a clear one-line usage error (exit 2, no traceback) or a recorded rejection; never a lost
row, never a file written outside the output folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest

from mmcurate.cli import main
from mmcurate.tests.support.foundation import (
    LAION,
    assert_usage_error,
    check_accounting,
    kept_table,
    key_of,
    read_folder,
    register,
    run_cli,
    sorted_files,
    write_yaml,
)
from mmcurate.tests.support.img2dataset_layout import write_img2dataset


class Sandbox:
    """An input folder, an empty working directory and a base pipeline; every call checks that nothing
    was written outside the output folder. Calls run in-process through ``mmcurate.cli.main`` (the
    console command's entry point, toy stages registered), or with ``real=True`` as a subprocess."""

    def __init__(self, tmp_path: Path, capsys, url_rows: list[dict]) -> None:
        self.tmp, self.capsys = tmp_path, capsys
        self.inputs, self.cwd, self.out = tmp_path / "in", tmp_path / "cwd", tmp_path / "out"
        self.inputs.mkdir()
        self.cwd.mkdir()
        pq.write_table(pa.Table.from_pylist(url_rows), self.inputs / "urls.parquet")
        self.base = write_yaml(
            self.inputs / "base.yaml",
            {
                "input": {"path": "urls.parquet", "url_col": "URL", "caption_col": "TEXT"},
                "output": {"path": str(self.out)},
                "workers": 1,
                "stages": [{"drop_word": {"word": "dog"}}],
            },
        )

    def cli(self, args: list[str], real: bool = False) -> subprocess.CompletedProcess:
        before = {p: (self.inputs / p).read_bytes() for p in sorted_files(self.inputs)}
        if real:
            result = run_cli(*args, cwd=self.cwd, toy=True)
        else:
            self.capsys.readouterr()
            code = main(args)
            captured = self.capsys.readouterr()
            result = subprocess.CompletedProcess(args, code, captured.out, captured.err)
        assert sorted_files(self.cwd) == [], "a file was written into the working directory"
        assert {p: (self.inputs / p).read_bytes() for p in sorted_files(self.inputs)} == before, "the input folder changed"
        assert {p.name for p in self.tmp.iterdir()} <= {"cwd", "in", "out"}, "a file was written beside the output"
        return result

    def usage(self, args: list[str], *fragments: str, real: bool = False) -> None:
        assert_usage_error(self.cli(args, real), *fragments)

    def stage(self, src: Path, *args: str) -> list[str]:
        return ["stage", "drop_word", "--input", str(src), "--output", str(self.out), "--workers", "1", "--no-progress", *args]

    def run_ok(self, src: Path, *args: str) -> Path:
        result = self.cli(self.stage(src, *args))
        assert result.returncode == 0, result.stderr
        return self.out


@pytest.fixture
def box(tmp_path: Path, url_rows: list[dict], capsys, monkeypatch) -> Sandbox:
    register(monkeypatch)
    sandbox = Sandbox(tmp_path, capsys, url_rows)
    monkeypatch.chdir(sandbox.cwd)
    return sandbox


def test_misnamed_columns(box: Sandbox) -> None:
    box.usage(["run", str(box.base), "--url-col", "link"], "no url column 'link'", "URL, TEXT", real=True)
    box.usage(["run", str(box.base), "--caption-col", "alt"], "no caption column 'alt'")
    (box.inputs / "links.csv").write_text("link,caption\nhttp://a/1.jpg,a cat\n")
    box.usage(box.stage(box.inputs / "links.csv"), "no url column 'url'", "link, caption")


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("missing.parquet", None, "does not exist"),
        ("broken.parquet", b"PAR1 this is not parquet", "cannot read"),
        ("empty.csv", b"", "empty file"),
        ("notes.data", b"http://a/1.jpg\n", "cannot tell the input format"),
    ],
)
def test_unreadable_inputs(box: Sandbox, name: str, content: bytes | None, fragment: str) -> None:
    if content is not None:
        (box.inputs / name).write_bytes(content)
    box.usage(box.stage(box.inputs / name), fragment)


def test_corrupt_img2dataset_tar(box: Sandbox, jpeg_photos: list[dict], photo_dir: Path) -> None:
    """A truncated tar loses its rows' images, not the run: each such row is rejected as tar_unreadable."""
    i2d = write_img2dataset(box.inputs / "i2d", jpeg_photos, photo_dir, shards=1)
    (i2d / "00000.tar").write_bytes((i2d / "00000.tar").read_bytes()[:700])  # truncated mid-member
    out = box.run_ok(i2d)
    rejects = pq.read_table(out / "rejects" / "00000.parquet").to_pylist()
    kept = pq.read_table(out / "meta" / "00000.parquet").num_rows
    rows = pq.read_table(i2d / "00000.parquet")
    assert kept + len(rejects) == rows.num_rows
    succeeded = rows.column("status").to_pylist().count("success")
    assert sum(r["reject_reason"] == "tar_unreadable" for r in rejects) == succeeded - kept > 0


def test_img2dataset_parquet_without_its_tar(box: Sandbox, jpeg_photos: list[dict], photo_dir: Path) -> None:
    """A Parquet file whose tar is missing is read: its downloaded rows are rejected as image_missing."""
    i2d = write_img2dataset(box.inputs / "i2d", jpeg_photos, photo_dir, shards=2)
    (i2d / "00001.tar").unlink()
    out = box.run_ok(i2d, "--set", "word=zzzz")
    assert check_accounting(out) == {"rows_in": 12, "kept": 5, "rejected": 7}
    expected = {f"00000{i:04d}": None for i in range(5)} | {"000000005": "not_downloaded"}
    expected |= {f"00001{i:04d}": "image_missing" for i in range(5)} | {"000010005": "not_downloaded"}
    assert reasons_by_key(out) == expected


def test_img2dataset_tar_without_its_parquet(box: Sandbox, jpeg_photos: list[dict], photo_dir: Path) -> None:
    """A tar without the Parquet file that lists its rows is refused, naming it, with nothing read."""
    i2d = write_img2dataset(box.inputs / "i2d", jpeg_photos, photo_dir, shards=2)
    (i2d / "00001.parquet").unlink()
    box.usage(box.stage(i2d), "00001.tar", "without its Parquet file")
    box.usage(box.stage(i2d, "--input-format", "img2dataset"), "00001.tar", "without its Parquet file")
    assert not box.out.exists()


def test_parquet_files_whose_column_types_differ(box: Sandbox) -> None:
    """int32 in one file and int64 in another is int64 in every shard (so pyarrow.dataset reads the output);
    int in one and text in another is a one-line error naming the column and both files."""
    folder = box.inputs / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"url": ["http://x/0.jpg", "http://x/1.jpg"], "n": pa.array([1, 2], pa.int32())}), folder / "a.parquet")
    pq.write_table(pa.table({"url": ["http://x/2.jpg"], "n": pa.array([3], pa.int64())}), folder / "b.parquet")
    out = box.run_ok(folder, "--rows-per-shard", "1", "--output-format", "parquet", "--set", "mode=score", "--set", "word=zzzz")
    assert check_accounting(out)["rows_in"] == 3
    assert pyarrow.dataset.dataset(out / "shards").to_table().column("n").to_pylist() == [1, 2, 3]
    assert {pq.read_schema(p).field("n").type for p in (out / "shards").glob("*.parquet")} == {pa.int64()}
    pq.write_table(pa.table({"url": ["http://x/3.jpg"], "n": ["three"]}), folder / "c.parquet")
    box.usage(box.stage(folder, "--output", str(box.tmp / "out2")), "column 'n' holds int32 in a.parquet but string in c.parquet")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "colour=red"], ("stage drop_word", "unknown option 'colour'", "word")),
        (["--set", "word="], ("word must not be empty",)),
        (["--set", "mode=fast"], ("mode must be filter or score",)),
        (["--set", "output.colour=red"], ("pipeline output", "unknown option 'colour'")),
        (["--set", "output.rows_per_shard=many"], ("rows_per_shard", "must be an integer")),
        (["--set", "output.format=zip"], ("format", "webdataset")),
        (["--set", "input.max_caption_chars=1.5"], ("max_caption_chars", "must be an integer")),
        (["--set", "workers=0"], ("workers", "must be between 1 and 512, not 0")),
        (["--workers", "100000"], ("'workers' must be between 1 and 512, not 100000",)),
        (["--set", "nothing"], ("KEY=VALUE",)),
        (["--rows-per-shard", "0"], ("rows_per_shard", "must be at least 1")),
        (["--set", "output.rows_per_shard=["], ("rows_per_shard", "must be an integer, not '['")),
        (["--set", "input.max_caption_chars=-1"], ("max_caption_chars", "must not be negative")),
        (["--set", "input=x"], ("--set input=x", "--input PATH", "input.path=PATH")),
        (["--set", "output=x"], ("--set output=x", "--output PATH")),
        (["--set", "stages=5"], ("--set stages=5", "pipeline YAML")),
        (["--input", "bogus://x"], ("bogus://x", "unknown URL scheme bogus://")),
        (["--output", "bogus://x/out"], ("bogus://x/out", "unknown URL scheme bogus://")),
    ],
)
def test_bad_options(box: Sandbox, args: list[str], fragments: tuple[str, ...]) -> None:
    box.usage(box.stage(box.inputs / "urls.parquet", "--url-col", "URL", *args), *fragments)


def test_bad_options_through_the_console_command(box: Sandbox) -> None:
    box.usage(box.stage(box.inputs / "urls.parquet", "--url-col", "URL", "--set", "seconds=1"), "unknown option 'seconds'", real=True)


def test_unknown_stage_name(box: Sandbox) -> None:
    box.usage(
        ["stage", "nosuch", "--input", str(box.inputs / "urls.parquet"), "--output", str(box.out), "--url-col", "URL"],
        "unknown stage 'nosuch'",
        "download",
        real=True,
    )
    box.usage(["run", str(box.base), "--set", "slow.seconds=1"], "no stage 'slow'")
    # Stage names and options are checked before a URL list is parsed into the output folder.
    (box.inputs / "urls.csv").write_text("url,caption\nhttp://a/1.jpg,a cat\n")
    box.usage(["stage", "nosuch", "--input", str(box.inputs / "urls.csv"), "--output", str(box.out)], "unknown stage 'nosuch'")
    box.usage(box.stage(box.inputs / "urls.csv", "--set", "mode=fast"), "mode must be filter or score")
    assert not box.out.exists()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("input: [unclosed\n", "not valid YAML"),
        ("- input\n- output\n", "a pipeline is a mapping"),
        ("input: {path: urls.parquet}\nstages: []\n", "output needs a path"),
        ("input: {path: urls.parquet}\noutput: {path: ../out}\nstage: []\n", "unknown key 'stage'"),
        ("input: {path: urls.parquet, url_col: URL}\noutput: {path: ../out}\nstages: [nosuch]\n", "unknown stage 'nosuch'"),
        ("input: {path: urls.parquet}\noutput: {path: ../out}\nstages: [{drop_word: [dog]}]\n", "a stage is a name or a mapping"),
        ("input: {path: urls.parquet}\noutput: {path: ../out}\nengine: warp\n", "engine must be one of"),
        ("input: {path: urls.parquet}\noutput: {path: ../out}\nstages: {caption_quality: {min_words: 8}}\n", "stages is a list"),
        ("input: {path: urls.parquet}\noutput: {path: ../out}\nstages: caption_quality\n", "stages is a list"),
        ("input: {path: urls.parquet, max_caption_chars: -1}\noutput: {path: ../out}\n", "'max_caption_chars' must not be negative"),
        (
            "input: {path: urls.parquet}\noutput: {path: ../out}\nstages: [{minhash_dedup: {num_perm: 100000000}}]\n",
            "'num_perm' must be between 2 and 1024",
        ),
        (
            "input: {path: urls.parquet}\noutput: {path: ../out}\nstages: [{download: {deadline: .nan}}]\n",
            "'deadline' must be a finite number",
        ),
        (
            "input: {path: urls.parquet}\noutput: {path: ../out}\nstages: [{download: {timeout: .nan}}]\n",
            "'timeout' must be a finite number",
        ),
        ("input: {path: urls.parquet}\noutput: {path: ../out}\nstages: [{download: {timeout: -1}}]\n", "'timeout' must be positive"),
    ],
)
def test_bad_yaml(box: Sandbox, text: str, fragment: str) -> None:
    (box.inputs / "bad.yaml").write_text(text)
    box.usage(["run", str(box.inputs / "bad.yaml")], fragment, real=fragment == "not valid YAML")


def test_empty_paths_are_refused(box: Sandbox) -> None:
    """An unset variable (``--input "$IN"``) or a blank YAML path is refused, never read as the current or the YAML's folder."""
    box.usage(["run", str(box.base), "--input", ""], "the input path is empty")
    box.usage(["run", str(box.base), "--output", " "], "the output path is empty")
    for section in ("input", "output"):
        paths = {"input": "urls.parquet", "output": str(box.out), section: ""}
        write_yaml(box.inputs / "blank.yaml", {name: {"path": path} for name, path in paths.items()})
        box.usage(["run", str(box.inputs / "blank.yaml")], f"the {section} path is empty")
    assert not box.out.exists()


def test_missing_pipeline_file(box: Sandbox) -> None:
    box.usage(["run", str(box.inputs / "nope.yaml")], "cannot read pipeline")


def test_pipeline_that_is_not_utf8(box: Sandbox) -> None:
    (box.inputs / "latin1.yaml").write_bytes(b"input: {path: urls.parquet}\n# caf\xe9\noutput: {path: ../out}\n")
    box.usage(["run", str(box.inputs / "latin1.yaml")], "latin1.yaml: not UTF-8 text", real=True)


def test_stage_set_reaches_the_stage_option_of_that_name_first() -> None:
    """``mmcurate stage NAME --set workers=3``: NAME's own ``workers`` option where it has one (nsfw's decoding
    threads), else the pipeline's; ``--workers`` is always the pipeline's."""
    from mmcurate.cli import _pipeline_from_args, build_parser

    def parsed(*args: str):
        return _pipeline_from_args(build_parser().parse_args(["stage", *args, "--input", "in.csv", "--output", "out"]))

    nsfw = parsed("nsfw", "--set", "workers=3", "--workers", "2")
    assert (nsfw.stages[0].params, nsfw.workers) == ({"workers": "3"}, 2)
    assert parsed("nsfw", "--set", "nsfw.workers=4").stages[0].params == {"workers": "4"}
    caption = parsed("caption_quality", "--set", "workers=3", "--set", "max_actors=5", "--set", "min_words=2")
    assert (caption.workers, caption.max_actors, caption.stages[0].params) == (3, 5, {"min_words": "2"})


def test_tool_arguments(box: Sandbox) -> None:
    """Bad arguments of the tools over an output: one line, nothing written."""
    out = box.run_ok(box.inputs / "urls.parquet", *LAION)
    (box.inputs / "binary.txt").write_bytes(bytes(range(256)))
    box.usage(["stats", str(out), "--plot", str(box.inputs)], f"cannot write --plot {box.inputs}")
    box.usage(["stats", str(out), "--plot", "missing/x.png"], "cannot write --plot missing/x.png", "No such file")
    box.usage(["report", str(out), "--seed", "-5"], "--seed must not be negative")
    box.usage(["export", "llava", str(out), "dest", "--instructions", str(box.inputs / "binary.txt")], "binary.txt: not UTF-8 text")


def test_destinations_that_cannot_be_written(box: Sandbox) -> None:
    """export DEST, report -o (and the figures beside it), stats --plot: one line before any work, nothing written."""
    out = box.run_ok(box.inputs / "urls.parquet", *LAION)
    file = box.inputs / "f.txt"
    file.write_text("mine")
    (box.inputs / "page.json").mkdir()
    box.usage(["export", "llava", str(out), str(file / "sub")], f"cannot write DEST {file}/sub: {file} is a file, not a folder")
    box.usage(["export", "llava", str(out), str(file / "a" / "b")], f"{file} is a file, not a folder", real=True)
    box.usage(["export", "llava", str(out), str(file)], f"cannot write DEST {file}: a file, not a folder")
    box.usage(["report", str(out), "-o", str(file / "r.html")], f"cannot write -o {file}/r.html: {file} is a file")
    box.usage(["report", str(out), "-o", str(box.inputs)], f"cannot write -o {box.inputs}: a folder, not a file")
    box.usage(["report", str(out), "-o", str(box.inputs / "page.html")], "the figures file of -o", "page.json: a folder")
    box.usage(["report", str(out), "-o", ""], "-o is empty: name a file")
    box.usage(["stats", str(out), "--plot", str(file / "funnel.png")], f"cannot write --plot {file}/funnel.png: {file} is a file")
    assert file.read_text() == "mine" and not list((box.inputs / "page.json").iterdir())
    if os.geteuid() != 0:  # root may write anywhere
        locked = box.inputs / "locked"
        locked.mkdir(mode=0o500)
        box.usage(["export", "llava", str(out), str(locked / "dest")], f"no write permission in {locked}")
        box.usage(["report", str(out), "-o", str(locked / "r.html")], f"no write permission in {locked}")


def test_report_never_overwrites_a_json_file_it_did_not_write(box: Sandbox) -> None:
    """report -o X.html writes its figures to X.json: a user's X.json there is refused, one line, nothing
    written; the figures file of an earlier report is replaced, so the same command runs twice."""
    out = box.run_ok(box.inputs / "urls.parquet", *LAION)
    (box.inputs / "notes.json").write_text('{"mine": true}')
    (box.inputs / "broken.json").write_bytes(b"\xff not json")
    box.usage(["report", str(out), "-o", str(box.inputs / "notes.html")], f"{box.inputs / 'notes.json'} exists and is not a report's")
    box.usage(["report", str(out), "-o", str(box.inputs / "broken.html")], "broken.json exists and is not a report's")
    page = box.tmp / "reports" / "page.html"
    for _ in range(2):
        assert main(["report", str(out), "-o", str(page)]) == 0
    assert json.loads(page.with_suffix(".json").read_text())["source"] == str(out)


# ---------------------------------------------------------------------------------------------
# Recorded rejections: the run finishes (exit 0) and every input row is accounted for.


def reasons_by_key(out: Path) -> dict[str, str | None]:
    """Every row of the output (kept: None) with its reason; read-time rejections carry stage ``read``."""
    rejects = read_folder(out / "rejects")
    found = {k: None for k in kept_table(out).column("key").to_pylist()}
    for row in rejects.select(["key", "reject_stage", "reject_reason"]).to_pylist():
        assert row["key"] not in found
        found[row["key"]] = row["reject_reason"]
        assert row["reject_stage"] == ("drop_word" if row["reject_reason"] == "has_word" else "read")
    return found


def test_bad_csv_rows_are_recorded(box: Sandbox) -> None:
    huge = "x" * 200_000  # over the default max_caption_chars and over the csv module's field limit
    lines = [
        b"URL,TEXT,extra",
        b"http://a/0.jpg,a fine caption,e0",
        b"http://a/1.jpg,too,many,fields",
        b"http://a/2.jpg",
        b"http://a/3.jpg,caf\xe9 latin-1,e3",
        b",no url,e4",
        b"  ,blank url,e5",
        f"http://a/6.jpg,{huge},e6".encode(),
        b"http://a/7.jpg,,e7",
        b'http://a/8.jpg,"quoted, with comma",e8',
        b"http://a/9.jpg,a dog,e9",
    ]
    (box.inputs / "bad.csv").write_bytes(b"\n".join(lines) + b"\n")
    out = box.run_ok(box.inputs / "bad.csv", *LAION)
    expected = [
        None,
        "malformed_row",
        "malformed_row",
        "invalid_utf8",
        "missing_url",
        "missing_url",
        "caption_too_long",
        None,
        None,
        "has_word",
    ]
    assert reasons_by_key(out) == {key_of("bad.csv", i): r for i, r in enumerate(expected)}
    assert check_accounting(out) == {"rows_in": 10, "kept": 3, "rejected": 7}
    rows = {r["key"]: r for r in read_folder(out / "rejects").to_pylist() + kept_table(out).to_pylist()}
    assert rows[key_of("bad.csv", 3)]["caption"] == "caf\ufffd latin-1"  # repaired for the audit, not silently kept
    assert rows[key_of("bad.csv", 1)]["url"] == "http://a/1.jpg"  # a malformed row keeps what could be read
    assert rows[key_of("bad.csv", 7)]["caption"] == "" and rows[key_of("bad.csv", 8)]["caption"] == "quoted, with comma"


def test_bad_jsonl_lines_are_recorded(box: Sandbox) -> None:
    lines = [
        b'{"url": "http://a/0.jpg", "caption": "ok", "n": 1}',
        b'{"url": "http://a/1.jpg", "caption": "cut',
        b"[1, 2]",
        b'{"url": null, "caption": "x"}',
        b'{"url": NaN, "caption": "x"}',
        b'{"url": "http://a/5.jpg", "caption": NaN}',
        b'{"url": "http://a/6.jpg", "caption": "\xff\xfe"}',
        b"",
        b'{"url": "http://a/7.jpg"}',
    ]
    (box.inputs / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = box.run_ok(box.inputs / "bad.jsonl")
    expected = [None, "malformed_row", "malformed_row", "missing_url", "missing_url", None, "invalid_utf8", None]
    assert reasons_by_key(out) == {key_of("bad.jsonl", i): r for i, r in enumerate(expected)}
    assert check_accounting(out)["rows_in"] == 8
    kept = {r["key"]: r for r in kept_table(out).to_pylist()}
    assert kept[key_of("bad.jsonl", 5)]["caption"] is None and kept[key_of("bad.jsonl", 7)]["caption"] is None
    assert kept[key_of("bad.jsonl", 0)]["n"] == "1"  # non-text values are kept as JSON text


def test_nulls_nan_and_bytes_in_parquet_are_recorded(box: Sandbox) -> None:
    table = pa.table(
        {
            "url": pa.array([b"http://a/0.jpg", None, b"", b"http://a/\xff.jpg", b"http://a/4.jpg", b"http://a/5.jpg"], pa.binary()),
            "caption": pa.array([1.5, 2.0, 3.0, 4.0, math.nan, None], pa.float64()),
        }
    )
    pq.write_table(table, box.inputs / "odd.parquet")
    out = box.run_ok(box.inputs / "odd.parquet")
    expected = [None, "missing_url", "missing_url", "invalid_utf8", None, None]
    assert reasons_by_key(out) == {key_of("odd.parquet", i): r for i, r in enumerate(expected)}
    kept = {r["key"]: r for r in kept_table(out).to_pylist()}
    assert kept[key_of("odd.parquet", 0)]["caption"] == "1.5" and kept[key_of("odd.parquet", 4)]["caption"] is None


def test_max_caption_chars_is_an_option(box: Sandbox) -> None:
    out = box.run_ok(box.inputs / "urls.parquet", *LAION, "--set", "input.max_caption_chars=30", "--set", "word=zzzz")
    source = pq.read_table(box.inputs / "urls.parquet").column("TEXT").to_pylist()
    expected = [("caption_too_long" if len(c) > 30 else None) for c in source]
    assert reasons_by_key(out) == {key_of("urls.parquet", i): r for i, r in enumerate(expected)}
    assert 0 < sum(r is not None for r in expected) < len(expected)


def test_hostile_tar_members_are_never_extracted(box: Sandbox, jpeg_photos: list[dict], photo_dir: Path) -> None:
    escape = box.tmp / "escaped.jpg"
    hostile = {
        "000000000.jpg": str(escape),
        "000000001.jpg": "../../000000001.jpg",
        "000000002.jpg": "->/etc/passwd",
        "000000003.jpg": "sub/../../000000003.jpg",
    }
    i2d = write_img2dataset(box.inputs / "i2d", jpeg_photos, photo_dir, shards=1, hostile=hostile)
    out = box.run_ok(i2d, "--output-format", "parquet", "--set", "mode=score")
    expected = ["image_missing"] * 4 + [None, "not_downloaded"]
    assert reasons_by_key(out) == {f"00000{i:04d}": r for i, r in enumerate(expected)}
    assert not escape.exists() and not (box.tmp.parent / "000000001.jpg").exists()
    assert kept_table(out).column("image").to_pylist() == [(photo_dir / jpeg_photos[4]["file"]).read_bytes()]
