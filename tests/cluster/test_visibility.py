"""What a node checks of a run's storage (:mod:`shards.visibility`), in this process: the input, the
driver's probe file in the output folder, a probe of its own; on a local disk and on S3."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.shards import visibility
from mmcurate.shards.layout import is_partial_write


@pytest.fixture
def storage(tmp_path: Path, request) -> tuple[str, str, fsspec.AbstractFileSystem]:
    """(input URL, output URL, the output's filesystem), on a local disk or S3 by the test's parameter."""
    table = pa.table({"url": ["http://example.invalid/0.jpg"], "caption": ["a photo"]})
    if request.param == "s3":
        fs, bucket = request.getfixturevalue("s3")
        with fs.open(f"{bucket}/in/urls.parquet", "wb") as f:
            pq.write_table(table, f)
        fs.pipe_file(f"{bucket}/out/_lease.json", b"{}")  # the run's lease is in the output folder when the check runs
        return f"{bucket}/in", f"{bucket}/out", fs
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "urls.parquet")
    (tmp_path / "out").mkdir()
    return str(tmp_path / "in"), str(tmp_path / "out"), fsspec.filesystem("file")


@pytest.mark.parametrize("storage", ["local", "s3"], indirect=True)
def test_a_node_that_sees_the_storage_leaves_nothing_behind(storage) -> None:
    inp, out, fs = storage
    before = set(fs.ls(out, detail=False))
    probe = visibility.place(inp, out)
    assert is_partial_write(probe.path.rsplit("/", 1)[-1])  # a temporary name: readers skip it, a resume removes a leftover
    assert visibility.look(probe) is None
    visibility.remove(probe)
    assert set(fs.ls(out, detail=False, refresh=True)) == before


@pytest.mark.parametrize("storage", ["local"], indirect=True)
def test_what_a_node_cannot_see_is_said(storage, tmp_path: Path) -> None:
    inp, out, _ = storage
    probe = visibility.place(inp, out)
    try:
        elsewhere = tmp_path / "own-disk"  # a node whose output path is a folder of its own disk
        elsewhere.mkdir()
        assert "does not see the driver's files in the output folder" in visibility.look(
            dataclasses.replace(probe, output=str(elsewhere), path=str(elsewhere / Path(probe.path).name))
        )
        assert "sees a different output folder" in visibility.look(dataclasses.replace(probe, token="another run's"))
        assert "sees a different input" in visibility.look(dataclasses.replace(probe, view="folder 0"))
        missing = visibility.look(dataclasses.replace(probe, input=str(tmp_path / "no-such-input")))
        assert missing.startswith(f"cannot read the input {tmp_path / 'no-such-input'}: FileNotFoundError")
    finally:
        visibility.remove(probe)
