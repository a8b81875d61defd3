"""The README's demo command, end to end through the real console command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds

from mmcurate.cli import main

EXPECTED_REJECTS = {
    ("download", "http_404"): 1,  # missing.jpg
    ("download", "not_an_image"): 1,  # broken.jpg is an HTML page served as image/jpeg
    ("image_size", "image_too_small"): 1,  # skimage_text.png is 172 px high
    ("caption_quality", "caption_filename"): 1,  # "IMG_1234.JPG"
    ("language", "unwanted_language"): 1,  # the French caption
}


def test_demo_runs_end_to_end_and_validates(tmp_path: Path):
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "demo"
    result = subprocess.run(
        [str(bin_dir / "mmcurate"), "demo", str(out), "--no-progress"], check=False, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "16 rows in 2 shards" in result.stdout
    assert (
        subprocess.run([str(bin_dir / "mmcurate"), "validate", str(out)], check=False, capture_output=True, text=True).stdout.strip()
        == "valid"
    )
    # The README's first command twice in a row: the second finds the run finished and changes nothing.
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    command = [str(bin_dir / "mmcurate"), "demo", str(out), "--no-progress"]
    again = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(tmp_path.rglob("*")) if p.is_file()} == files

    kept = ds.dataset(out / "meta", format="parquet").to_table()
    rejects = ds.dataset(out / "rejects", format="parquet").to_table().to_pylist()
    assert kept.num_rows + len(rejects) == 16
    counts: dict = {}
    for row in rejects:
        counts[(row["reject_stage"], row["reject_reason"])] = counts.get((row["reject_stage"], row["reject_reason"]), 0) + 1
    dedup = {k: v for k, v in counts.items() if k[0] in ("exact_dedup", "minhash_dedup")}
    assert {k: v for k, v in counts.items() if k not in dedup} == EXPECTED_REJECTS
    # The same photo under two URLs, and two captions that differ only in case and punctuation.
    assert dedup == {("exact_dedup", "duplicate_image"): 1, ("minhash_dedup", "duplicate_caption"): 1}
    kept_keys = set(kept.column("key").to_pylist())
    for row in rejects:
        if row["reject_stage"].endswith("_dedup"):
            assert row["duplicate_of"] in kept_keys
    assert kept.num_rows == 9

    # The report of the demo opens with the funnel, then the histograms, then the sample grid.
    page = tmp_path / "report" / "report.html"
    assert main(["report", str(out), "-o", str(page)]) == 0
    text = page.read_text()
    assert 0 < text.index("id='funnel'") < text.index("id='histograms'") < text.index("id='samples'")
    assert all(f"<td>{stage}</td>" in text for stage in ("download", "image_size", "caption_quality", "language", "exact_dedup"))
    assert text.count("<div class='card'>") >= 1 and text.count("<div class='card rejected'>") >= 5
