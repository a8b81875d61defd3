"""End to end through the real CLI: a URL list against the local server to WebDataset shards."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

GOOD = ["/img/jpeg", "/img/png", "/img/webp", "/img/gif", "/img/cmyk", "/img/rgba", "/img/exif", "/redirect/2"]
BAD = {"/status/404": "http_404", "/hang": "timeout", "/img/html": "not_an_image", "/robots/noai": "opted_out", "/loop/a": "redirect_loop"}


@pytest.mark.slow
def test_run_download_pipeline_to_webdataset(server, tmp_path):
    paths = GOOD + list(BAD)
    urls = [server.url(p) for p in paths] + ["ftp://127.0.0.1/x.jpg"]
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), tmp_path / "urls.parquet")
    (tmp_path / "pipeline.yaml").write_text(
        "input: {path: urls.parquet}\n"
        "output: {path: out, format: webdataset, rows_per_shard: 5}\n"
        "workers: 2\n"
        "stages:\n"
        "  - download: {image_size: 128, deadline: 2, timeout: 5, allow_private_networks: true}\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mmcurate.cli", "run", str(tmp_path / "pipeline.yaml"), "--no-progress"],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"

    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert len(tars) == 3
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert len(samples) == len(GOOD)
    for key, image, caption, meta in samples:
        assert min(image.size) == 128 and image.mode == "RGB"
        assert meta["status"] == "ok" and meta["key"] == key and caption.startswith("caption ")
        assert (meta["width"], meta["height"]) == image.size

    rejects = pa.concat_tables([pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet"))])
    expected = Counter({**{r: 1 for r in BAD.values()}, "bad_scheme": 1})
    assert Counter(rejects.column("reject_reason").to_pylist()) == expected
    assert rejects.column("status").to_pylist() == rejects.column("reject_reason").to_pylist()
    assert set(rejects.column("reject_stage").to_pylist()) == {"download"}
    assert len(urls) == len(samples) + rejects.num_rows

    stats = subprocess.run(
        [sys.executable, "-m", "mmcurate.cli", "stats", str(out), "--json"], check=False, capture_output=True, text=True, timeout=60
    )
    summary = json.loads(stats.stdout)
    assert (summary["rows_in"], summary["kept"], summary["rejected"]) == (len(urls), len(GOOD), rejects.num_rows)
    assert summary["stages"]["download"]["reasons"] == dict(expected)
