"""capfilt on the local and the Ray engine gives the same captions, scores and decisions."""

from __future__ import annotations

import math
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
    assert same(results["ray"], results["local"])


def same(a: object, b: object) -> bool:
    """Equal structures; floats within 1e-5 (engines may batch rows differently, and a batch's sums
    may round differently). Texts, keys and decisions must match exactly."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b
