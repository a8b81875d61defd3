"""``mmcurate report``: the page renders in headless Chromium (no console error, every image decodes, the
grounding boxes are drawn), report.json holds its figures, and only the sampled samples' images are read."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.cli import main
from mmcurate.schemas import conform
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.writers import OutputSpec, write_shard
from mmcurate.tests.support.coco import coco_grounded_table

# Appended to a copy of the page by the test only: records script errors, the decoded width of every
# image and the drawn size of every box into a <pre id=checks> that --dump-dom prints.
CHECKS = """<script>
window.addEventListener('error', e => (window.checkErrors = window.checkErrors || []).push(String(e.message)));
window.addEventListener('load', () => {
  const boxes = [...document.querySelectorAll('.box')].map(b => { const r = b.getBoundingClientRect(); return [r.width, r.height]; });
  const pre = document.createElement('pre');
  pre.id = 'checks';
  pre.textContent = JSON.stringify({images: [...document.images].map(i => i.naturalWidth), boxes, errors: window.checkErrors || []});
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """The grounded COCO photos as a 2-shard WebDataset output: CapFilt candidates and CLIP scores on every
    row; rows 0-3 rejected as duplicates of rows 6-7, rows 4-5 for a low CLIP score (rejected images kept)."""
    table = coco_grounded_table(photo_dir)
    n = table.num_rows
    keys = table.column("key").to_pylist()
    captions = [[{"text": c, "source": "web", "score": 0.3 + 0.01 * i}, {"text": f"a photo {i}", "source": "synthetic", "score": 0.6}]
                for i, c in enumerate(table.column("caption").to_pylist())]  # fmt: skip
    reasons = ["duplicate_image"] * 4 + ["low_clip_score"] * 2 + [None] * (n - 6)
    table = table.drop_columns(["reject_reason"]).append_column("captions", pa.array(captions))
    table = table.append_column("clip_score", pa.array([0.1 + 0.02 * i for i in range(n)], pa.float32()))
    stages = {"duplicate_image": "exact_dedup", "low_clip_score": "clip_score", None: None}
    table = table.append_column("reject_stage", pa.array([stages[r] for r in reasons], pa.string()))
    table = table.append_column("reject_reason", pa.array(reasons, pa.string()))
    table = table.append_column("duplicate_of", pa.array([keys[6 + i % 2] if i < 4 else None for i in range(n)], pa.string()))
    table = conform(table)
    out = OutputDir.open(str(tmp_path_factory.mktemp("report") / "out"))
    spec = OutputSpec(out.root, format="webdataset", save_rejected_images=True)
    half = n // 2
    for shard, part in enumerate((table.slice(0, half), table.slice(half))):
        rejected = part.column("reject_reason").to_pylist()
        by_stage: dict = {}
        for stage, reason in zip(part.column("reject_stage").to_pylist(), rejected, strict=True):
            if reason:
                by_stage.setdefault(stage, {}).setdefault(reason, 0)
                by_stage[stage][reason] += 1
        entries = [{"stage": s, "rows_in": 0, "rejected": sum(by_stage.get(s, {}).values()), "reasons": by_stage.get(s, {}), "seconds": 0.0}
                  for s in ("clip_score", "exact_dedup")]  # fmt: skip
        n_rejected = sum(r is not None for r in rejected)
        stats = {"shard": shard, "rows_in": part.num_rows, "kept": part.num_rows - n_rejected, "rejected": n_rejected, "stages": entries}
        write_shard(out, spec, shard, part, part.column_names, stats)
    return Path(out.root)


def render(page: Path, tmp_path: Path) -> tuple[dict, str]:
    """The checks recorded by a copy of ``page`` loaded in headless Chromium, and Chromium's console log lines."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECKS + "</body>"))
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
         "--dump-dom", probe.as_uri()],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'<pre id="checks">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(found.group(1).replace("&quot;", '"')), "\n".join(console)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (.ci/run installs it: apt-get install chromium)")
def test_report_renders_in_chromium_with_images_and_boxes(curated: Path, tmp_path: Path):
    html = tmp_path / "site" / "report.html"
    assert main(["report", str(curated), "-o", str(html), "--samples", "12"]) == 0
    figures = json.loads((html.parent / "report.json").read_text())
    page = html.read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page.replace("https://img.invalid", "")
    checks, console = render(html, tmp_path)
    assert console == "" and checks["errors"] == []
    # Every image decodes: the funnel, one histogram per figure, and a thumbnail per sample and cluster member.
    assert checks["images"] and all(width > 0 for width in checks["images"])
    assert len(checks["images"]) >= 1 + len(figures["histograms"]) + len(figures["samples"])
    # Every box of the shown samples and cluster members is drawn with a size.
    assert sum(len(e["boxes"]) for s in figures["samples"] for e in s.get("grounding", ())) > 0
    assert checks["boxes"] and all(w > 0 and h > 0 for w, h in checks["boxes"])
    assert len(checks["boxes"]) == page.count("class='box'")


def test_report_figures(curated: Path, tmp_path: Path):
    """The figures of ``-o week1.html`` go to ``week1.json`` beside it (two reports in one folder keep theirs apart)."""
    html = tmp_path / "week1.html"
    assert main(["report", str(curated), "-o", str(html), "--samples", "8", "--seed", "3"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["week1.html", "week1.json"]
    figures = json.loads((tmp_path / "week1.json").read_text())
    summary = figures["summary"]
    assert (summary["rows_in"], summary["kept"], summary["rejected"]) == (36, 30, 6)
    assert summary["stages"]["exact_dedup"]["reasons"] == {"duplicate_image": 4}
    assert {"clip_score", "num_boxes", "caption_length", "capfilt_score (web)", "capfilt_score (synthetic)"} <= set(figures["histograms"])
    assert sum(figures["histograms"]["clip_score"]["counts"]) == 36
    assert sum(figures["histograms"]["capfilt_score (synthetic)"]["counts"]) == 36
    # Two clusters of three: each kept row with the two rows removed as its duplicates.
    assert figures["duplicate_clusters"]["sizes"] == {"3": 2}
    assert [len(c["removed"]) for c in figures["duplicate_clusters"]["shown"]] == [2, 2]
    # The stratified sample: half kept, the rest spread over both rejection reasons.
    samples = figures["samples"]
    assert len(samples) == 8 and all(s["thumbnail"] for s in samples)
    assert sum("reject_reason" not in s for s in samples) == 4
    assert {s.get("reject_reason") for s in samples} == {None, "duplicate_image", "low_clip_score"}


def test_report_reads_only_the_sampled_images(curated: Path, tmp_path: Path, monkeypatch):
    from mmcurate.shards import readers
    from mmcurate.tooling import report

    read: list[str] = []
    real = readers.read_members

    def spy(fileobj, index, keys, max_bytes):
        for key, found in real(fileobj, index, keys, max_bytes):
            read.append(key)
            yield key, found

    monkeypatch.setattr(report, "read_members", spy)
    figures = report.build_report(str(curated), str(tmp_path / "r.html"), report.Options(samples=2))
    clusters = figures["duplicate_clusters"]["shown"]
    shown = {s["key"] for s in figures["samples"]} | {k for c in clusters for k in [c["keeper"], *c["removed"]]}
    rejected = {k for c in clusters for k in c["removed"]}
    rejected |= {s["key"] for s in figures["samples"] if "reject_reason" in s}
    # Kept images come from the tars, one member each; rejected ones from the rejects file's image column.
    assert sorted(read) == sorted(shown - rejected) and 0 < len(read) < 10


def test_report_refuses_a_folder_that_is_not_an_output_and_a_page_inside_the_output(curated: Path, tmp_path: Path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert main(["report", str(curated), "-o", str(curated / "r.html")]) == 2
    assert "not an mmcurate output" in capsys.readouterr().err
    assert main(["report", str(curated), "-o", str(tmp_path / "r.json")]) == 2  # the page would be overwritten by its figures
    assert "name the page .html" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
