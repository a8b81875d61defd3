"""The README's demo command, end to end through the real console command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from mmcurate.cli import main
from mmcurate.errors import UsageError

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
    (tmp_path / "demo-urls").write_text("precious\n")  # where an earlier demo wrote its URL list: the user's file now
    result = subprocess.run(
        [str(bin_dir / "mmcurate"), "demo", str(out), "--no-progress"], check=False, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "16 rows in 2 shards" in result.stdout
    # The URL list, the run's input, lives in the output's own marked _input/: nothing is written beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "demo-urls"]
    assert (tmp_path / "demo-urls").read_text() == "precious\n"
    assert json.loads((out / "run.json").read_text())["pipeline"]["input"]["path"] == str(out / "_input" / "urls.jsonl")
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


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", ["foreign", "file", "foreign_input", "other_run"])
def test_demo_refuses_an_output_it_did_not_write_before_writing_anything(tmp_path: Path, capsys, case: str):
    """Nothing is written anywhere, the user's files beside the output and in it included: one line, exit 2."""
    out = tmp_path / "d"
    (tmp_path / "d-urls").mkdir()
    (tmp_path / "d-urls" / "urls.jsonl").write_text("precious\n")  # where an earlier demo wrote its URL list
    if case == "file":
        out.write_text("precious\n")
    elif case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("precious\n")
    elif case == "foreign_input":
        (out / "_input").mkdir(parents=True)
        (out / "_input" / "urls.jsonl").write_text("precious\n")
    else:  # the output of another pipeline's run
        out.mkdir()
        (out / "run.json").write_text(json.dumps({"pipeline": {"input": {"path": "/data/urls.csv"}}, "shards": 1}))
    before = tree(tmp_path)
    assert main(["demo", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmcurate: error: ") and err.count("\n") == 1, err
    assert tree(tmp_path) == before


def test_a_demo_stopped_before_its_run_starts_leaves_nothing(tmp_path: Path, monkeypatch):
    from mmcurate.examples import demo

    def refuse(*args, **kwargs):
        raise UsageError("refused")

    monkeypatch.setattr(demo, "run_pipeline", refuse)
    with pytest.raises(UsageError):
        demo.run_demo(str(tmp_path / "d"), progress=False)
    assert list(tmp_path.iterdir()) == []
    # Into an existing empty folder: the folder stays, empty.
    (tmp_path / "e").mkdir()
    with pytest.raises(UsageError):
        demo.run_demo(str(tmp_path / "e"), progress=False)
    assert tree(tmp_path) == {"e": None}
