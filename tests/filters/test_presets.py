"""The presets end to end: `mmcurate run PRESET --input URLS --output OUT` on real photos served locally."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from mmcurate.examples.demo import serve
from mmcurate.pipelines.config import load_pipeline
from mmcurate.tests.support.filters import kept, rejects, run_cli, run_command

PRESETS = ("datacomp_basic", "laion", "cogvlm")
LOOPBACK = "download.allow_private_networks=true"  # the photos are served on 127.0.0.1
OTHER_CAPTIONS = ["IMG_4031.JPG", "Une assiette de nourriture posée sur une table en bois.", "Red bus"]


@pytest.fixture(scope="module")
def url_list(tmp_path_factory, photo_dir: Path, photos: pa.Table):
    """A JSONL URL list of the photos (known captions, a few replaced) and the served base URL."""
    folder = tmp_path_factory.mktemp("urls")
    with serve(photo_dir) as base:
        lines = []
        for i, (key, fmt, caption) in enumerate(
            zip(
                photos.column("key").to_pylist(),
                photos.column("image_format").to_pylist(),
                photos.column("caption").to_pylist(),
                strict=True,
            )
        ):
            if i % 10 == 3:
                caption = OTHER_CAPTIONS[(i // 10) % len(OTHER_CAPTIONS)]
            lines.append(json.dumps({"url": f"{base}/{key}.{fmt}", "caption": caption}))
        (folder / "urls.jsonl").write_text("\n".join(lines) + "\n")
        yield folder / "urls.jsonl"


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_build(name: str) -> None:
    pipeline = load_pipeline(name, {"input": "in.parquet", "output": "out"})
    assert pipeline.input.path == "in.parquet" and pipeline.output.path == "out"
    stages = [s.build() for s in pipeline.stages]
    assert stages[0].name == "download" and len(stages) > 2


def test_run_without_paths_is_a_usage_error(capsys) -> None:
    assert run_cli("run", "datacomp_basic") == 2
    assert "input needs a path" in capsys.readouterr().err


@pytest.mark.slow
def test_datacomp_basic(tmp_path: Path, url_list: Path, photos: pa.Table) -> None:
    out = tmp_path / "out"
    assert run_command("run", "datacomp_basic", url_list, out, LOOPBACK) == 0
    table = kept(out)
    assert 0 < table.num_rows < photos.num_rows
    for row in table.select(["original_width", "original_height", "caption", "language"]).to_pylist():
        w, h = row["original_width"], row["original_height"]
        assert min(w, h) >= 200 and max(w, h) / min(w, h) <= 3
        assert len(row["caption"].split()) > 2 and len(row["caption"]) > 5 and row["language"] == "en"
    assert max(table.column("width").to_pylist() + table.column("height").to_pylist()) <= 512
    reasons = set(rejects(out).values())
    assert {"image_too_small", "caption_missing", "unwanted_language", "caption_too_short"} <= reasons


@pytest.mark.slow
def test_laion_and_cogvlm(tmp_path: Path, url_list: Path, photos: pa.Table, tiny_clip: str) -> None:
    laion = tmp_path / "laion"
    assert run_command("run", "laion", url_list, laion, LOOPBACK, f"clip_score.model={tiny_clip}", "clip_score.min_score=0.0") == 0
    table = kept(laion)
    assert table.num_rows > 0 and min(table.column("clip_score").to_pylist()) >= 0.0
    assert table.column("nsfw_score").null_count == 0 and set(table.column("language").to_pylist()) == {"en"}

    cogvlm = tmp_path / "cogvlm"
    assert run_command("run", "cogvlm", url_list, cogvlm, LOOPBACK) == 0
    reasons = rejects(cogvlm)
    assert set(reasons.values()) == {"caption_missing", "caption_filename"}  # no photo is 6:1 or NSFW
    assert kept(cogvlm).num_rows + len(reasons) == photos.num_rows
