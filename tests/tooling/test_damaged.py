"""The tools over a damaged output (inspect, stats, report, diff): one line naming the damaged file, exit 2,
never a traceback; validate lists it as a problem. And they never contradict what mmcurate itself writes:
a key rejected as duplicate_key, a finished run of no rows, the tar of a WebDataset shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.cli import main

TOOLS = ("inspect", "stats", "report", "diff")


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def curate(source: Path, out: Path, fmt: str = "webdataset") -> Path:
    """``mmcurate run`` of no stage over ``source``: 4 rows per shard."""
    pipeline = out.parent / f"{out.name}.yaml"
    pipeline.write_text(json.dumps({"input": {"path": str(source)}, "output": {"path": str(out), "format": fmt, "rows_per_shard": 4}}))
    assert main(["run", str(pipeline), "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory, img2dataset_output: Path) -> Path:
    """A WebDataset output of 12 rows in 3 shards (2 failed downloads rejected at read)."""
    return curate(img2dataset_output, tmp_path_factory.mktemp("damaged") / "intact")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# damage, the file it hits, the tools that must refuse (the others may not read that file), a fragment of the line
DAMAGES = [
    ("stats_not_json", "_stats/00000.json", ("stats", "report", "diff"), "damaged (Expecting"),
    ("stats_wrong_type", "_stats/00000.json", ("stats", "report", "diff"), "damaged (kept is 'x', not a count)"),
    ("meta_truncated", "meta/00000.parquet", ("inspect", "report", "diff"), "damaged (Parquet magic bytes"),
    ("rejects_garbage", "rejects/00000.parquet", ("inspect", "report", "diff"), "damaged (Parquet magic bytes"),
    ("tar_truncated", "shards/00001.tar", ("inspect", "diff"), "00001.tar: "),
    ("meta_missing", "meta/00001.parquet", TOOLS, "missing, though its shard's done marker lists it"),
    ("sizes_wrong_count", "shards/sizes.json", (), ""),  # no tool but validate reads it
]


@pytest.mark.parametrize("damage, name, refusing, fragment", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_output_is_one_line_naming_the_file(
    intact: Path, tmp_path: Path, capsys, damage: str, name: str, refusing: tuple[str, ...], fragment: str
) -> None:
    out = tmp_path / "out"
    shutil.copytree(intact, out)
    target = out / name
    if damage == "stats_not_json":
        target.write_text("{")
    elif damage == "stats_wrong_type":
        target.write_text(json.dumps({**json.loads(target.read_text()), "kept": "x"}))
    elif damage == "rejects_garbage":
        target.write_bytes(b"PAR1" + b"\x00garbage" * 50)
    elif damage == "sizes_wrong_count":
        target.write_text(json.dumps({**json.loads(target.read_text()), "00000.tar": 99}))
    elif damage == "meta_missing":
        target.unlink()
    else:
        _truncate(target)
    args = {"inspect": [], "stats": [], "report": ["-o", str(tmp_path / "rep.html")], "diff": [str(intact)]}
    for tool in TOOLS:
        code, _, err = run(capsys, tool, str(out), *args[tool])
        assert "Traceback" not in err, (tool, err)
        if tool in refusing:
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, (tool, code, err)
            assert str(target) in lines[0] and fragment in lines[0], (tool, lines[0])
        else:
            assert code in (0, 1), (tool, code, err)
    code, found, _ = run(capsys, "validate", str(out))
    assert code == 1 and any(line.startswith(str(target)) for line in found.splitlines()), found
    assert run(capsys, "validate", str(intact))[:2] == (0, "valid\n")


def test_validate_names_the_files_of_the_runs_format(intact: Path, tmp_path: Path, capsys) -> None:
    """A WebDataset shard without its tar: the tar is missing, not a Parquet shard mmcurate never writes."""
    out = tmp_path / "out"
    shutil.copytree(intact, out)
    (out / "shards" / "00002.tar").unlink()
    code, found, _ = run(capsys, "validate", str(out))
    assert code == 1 and f"{out}/shards/00002.tar: missing" in found and ".parquet: missing" not in found


def test_validate_accepts_the_readers_duplicate_key_rejects(img2dataset_output: Path, tmp_path: Path, capsys) -> None:
    """A key repeated in an input shard: the reader keeps the first row and rejects the next as
    read/duplicate_key, so the key is in meta and in rejects; validate accepts exactly that."""
    source = tmp_path / "i2d"
    shutil.copytree(img2dataset_output, source)
    table = pq.read_table(source / "00000.parquet")
    keys = table.column("key").to_pylist()
    keys[1] = keys[0]
    pq.write_table(table.set_column(table.column_names.index("key"), "key", pa.array(keys)), source / "00000.parquet")
    out = curate(source, tmp_path / "out", fmt="parquet")
    rejects = pq.read_table(out / "rejects" / "00000.parquet").to_pylist()
    assert [(r["key"], r["reject_stage"], r["reject_reason"]) for r in rejects if r["key"] == keys[0]] == [
        (keys[0], "read", "duplicate_key")
    ]
    assert keys[0] in pq.read_table(out / "shards" / "00000.parquet").column("key").to_pylist()
    assert run(capsys, "validate", str(out))[:2] == (0, "valid\n")
    # The same key twice for any other reason, or a duplicate_key row repeating no key of its shard, is a problem.
    path = out / "rejects" / "00000.parquet"
    rejected = pq.read_table(path)
    for reason, key, expected in (("http_404", keys[0], "also in"), ("duplicate_key", "nowhere", "no other row of its shard holds it")):
        extra = {**rejected.to_pylist()[0], "key": key, "reject_stage": "read", "reject_reason": reason}
        pq.write_table(pa.Table.from_pylist([*rejected.to_pylist(), extra], schema=rejected.schema), path)
        code, found, _ = run(capsys, "validate", str(out))
        assert code == 1 and expected in found, found


def test_tools_on_a_finished_run_of_no_rows(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "urls.csv").write_text("url,caption\n")
    monkeypatch.chdir(tmp_path)
    out = curate(tmp_path / "urls.csv", tmp_path / "out", fmt="parquet")
    code, found, err = run(capsys, "stats", str(out), "--json")
    assert code == 0, err
    assert {k: json.loads(found)[k] for k in ("shards", "rows_in", "kept", "rejected")} == dict.fromkeys(
        ("shards", "rows_in", "kept", "rejected"), 0
    )
    code, found, err = run(capsys, "report", str(out), "-o", str(tmp_path / "rep.html"))
    assert code == 0 and "report of 0 rows" in found, err
    assert run(capsys, "validate", str(out))[:2] == (0, "valid\n")
    assert run(capsys, "diff", str(out), str(out))[0] == 0
