"""Text URL lists are parsed in chunks: the result must not depend on the chunk size."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcurate.shards import readers
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.readers import InputSpec, plan_input


def _read_all(reader: readers.Reader) -> pa.Table:
    return pa.concat_tables([reader.read(plan) for plan in reader.shards])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_chunked_parse_equals_whole_file_parse(tmp_path, laion_sample, monkeypatch, fmt):
    rows = pq.read_table(laion_sample).slice(0, 60).to_pylist()
    path = tmp_path / f"urls.{fmt}"
    if fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["URL", "TEXT"])
            for i, row in enumerate(rows):
                writer.writerow([row["URL"], row["TEXT"]] + (["extra field"] if i % 17 == 5 else []))
    else:
        import json

        lines = [json.dumps(row) if i % 17 != 5 else "{not json" for i, row in enumerate(rows)]
        lines[30] = json.dumps({**rows[30], "late_column": "only here"})
        path.write_text("\n".join(lines) + "\n")
    spec = InputSpec(str(path), url_col="URL", caption_col="TEXT")

    whole = _read_all(plan_input(spec, 25, OutputDir.open(str(tmp_path / "whole"))))
    monkeypatch.setattr(readers, "PARSE_CHUNK_ROWS", 7)
    chunked = _read_all(plan_input(spec, 25, OutputDir.open(str(tmp_path / "chunked"))))

    assert chunked.num_rows == whole.num_rows == 60
    assert chunked.equals(whole)
    assert chunked.column("reject_reason").to_pylist().count("malformed_row") == 4
    assert chunked.column("key").to_pylist() == [readers.sample_key(f"urls.{fmt}", i) for i in range(60)]
    if fmt == "jsonl":
        assert chunked.column("late_column").to_pylist()[30] == "only here"
