"""capfilt on the local and the Ray engine gives the same captions, scores and decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmcurate.engines import run_pipeline
from mmcurate.pipelines.config import parse_pipeline
from mmcurate.tests.support.capfilt import read_rows

pytest.importorskip("ray")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_local_and_ray_agree(tmp_path: Path, img2dataset_output: Path, tiny_blip: dict) -> None:
    stage = {"capfilt": {"captioner": tiny_blip["captioner"], "filter_model": tiny_blip["itm"], "batch_size": 4, "mode": "score"}}
    results = {}
    for engine in ("local", "ray"):
        pipeline = parse_pipeline(
            {
                "input": {"path": str(img2dataset_output)},
                "output": {"path": str(tmp_path / engine)},
                "stages": [stage],
                "engine": engine,
                "workers": 2,
            }
        )
        summary = run_pipeline(pipeline, progress=False)
        assert summary["rows_in"] == summary["kept"] + summary["rejected"] == 12
        results[engine] = read_rows(tmp_path / engine)
    assert sum(r["captions"] is not None for r in results["local"].values()) == 10
    assert results["ray"] == results["local"]
