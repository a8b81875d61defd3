"""Writers: Parquet <-> WebDataset round trips; shards load with webdataset and pyarrow.dataset."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mmcurate.schemas import METADATA_KEY, SCHEMA_VERSION
from mmcurate.tests.support.foundation import check_accounting, kept_table, read_folder, run_cli, tables_equal, write_yaml


def convert(tmp_path: Path, src: Path, name: str, fmt: str, rows_per_shard: int = 4) -> Path:
    """A run with no stages through the console command: a pure format conversion."""
    out = tmp_path / name
    pipeline = write_yaml(
        tmp_path / f"{name}.yaml",
        {
            "input": {"path": str(src)},
            "output": {"path": name, "format": fmt, "rows_per_shard": rows_per_shard},
            "workers": 1,
            "stages": [],
        },
    )
    result = run_cli("run", str(pipeline), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, img2dataset_output: Path) -> dict[str, Path]:
    """img2dataset -> parquet -> webdataset -> parquet."""
    tmp = tmp_path_factory.mktemp("roundtrip")
    p1 = convert(tmp, img2dataset_output, "p1", "parquet")
    w2 = convert(tmp, p1, "w2", "webdataset")
    p3 = convert(tmp, w2, "p3", "parquet")
    return {"p1": p1, "w2": w2, "p3": p3}


def test_parquet_webdataset_round_trip_is_lossless(round_trip: dict[str, Path]) -> None:
    p1, w2, p3 = kept_table(round_trip["p1"]), kept_table(round_trip["w2"]), kept_table(round_trip["p3"])
    assert p1.num_rows == 10 and p1.column("image").null_count == 0
    assert tables_equal(p1, p3)
    assert tables_equal(p1.drop_columns(["image"]), w2)
    for name in ("p1", "w2", "p3"):
        assert check_accounting(round_trip[name])["kept"] == 10


def test_webdataset_shards_load_with_webdataset_library(round_trip: dict[str, Path]) -> None:
    import webdataset as wds

    out = round_trip["w2"]
    meta = {r["key"]: r for r in kept_table(out).to_pylist()}
    images = {r["key"]: r["image"] for r in kept_table(round_trip["p1"]).to_pylist()}
    tars = sorted((out / "shards").glob("*.tar"))
    urls = f"{out}/shards/{{{tars[0].stem}..{tars[-1].stem}}}.tar"
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == list(meta)
    for s in samples:
        row = meta[s["__key__"]]
        assert s["jpg"] == images[s["__key__"]]
        assert s["txt"] == row["caption"]
        assert s["json"] == {k: v for k, v in row.items() if k not in ("caption", "image")}
    decoded = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil")))
    assert decoded["jpg"].size == (meta[decoded["__key__"]]["width"], meta[decoded["__key__"]]["height"])


def test_tar_members_and_bytes_are_deterministic(round_trip: dict[str, Path], tmp_path: Path) -> None:
    out = round_trip["w2"]
    tar_path = min((out / "shards").glob("*.tar"))
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    keys = pq.read_table(out / "meta" / f"{tar_path.stem}.parquet").column("key").to_pylist()
    assert [m.name for m in members] == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
    assert all(m.isfile() and m.mtime == 0 and "/" not in m.name for m in members)
    again = convert(tmp_path, round_trip["p1"], "w2_again", "webdataset")
    for name in sorted(p.name for p in (out / "shards").iterdir()):
        assert (again / "shards" / name).read_bytes() == (out / "shards" / name).read_bytes()


def test_shards_load_with_pyarrow_dataset(round_trip: dict[str, Path]) -> None:
    for out, folder in ((round_trip["w2"], "meta"), (round_trip["p3"], "shards"), (round_trip["p3"], "rejects")):
        table = ds.dataset(str(out / folder), format="parquet").to_table()
        assert tables_equal(table.replace_schema_metadata(None), read_folder(out / folder).replace_schema_metadata(None))
    schema = ds.dataset(str(round_trip["p3"] / "shards"), format="parquet").schema
    assert schema.metadata[METADATA_KEY] == SCHEMA_VERSION.encode()
    assert schema.field("image").type == pa.binary() and schema.field("width").type == pa.int32()
    rejects = read_folder(round_trip["p3"] / "rejects")
    assert rejects.num_rows == 0  # the failures were rejected in p1, whose kept rows are p3's input
    p1_rejects = read_folder(round_trip["p1"] / "rejects")
    assert p1_rejects.column("reject_reason").to_pylist() == ["not_downloaded", "not_downloaded"]
    assert "image" not in p1_rejects.column_names  # rejected image bytes are dropped by default
