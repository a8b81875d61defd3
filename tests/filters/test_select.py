"""select: thresholds on stored scores per shard, top fraction over the dataset; score once, select many."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mmcurate.errors import UsageError
from mmcurate.filters.select import Select
from mmcurate.pipelines.reference import stage_markdown
from mmcurate.tests.support.filters import kept, rejects, run_cli, run_command


def scored() -> pa.Table:
    return pa.table(
        {
            "key": ["a", "b", "c", "d", "e", "f"],
            "clip_score": pa.array([0.30, 0.28, 0.10, None, 0.50, 0.30], pa.float32()),
            "nsfw_score": pa.array([0.1, 0.9, 0.2, 0.1, 0.5, 0.0], pa.float32()),
            "reject_reason": pa.nulls(6, pa.string()),
        }
    )


def test_thresholds_are_inclusive_and_missing_scores_rejected() -> None:
    stage = Select.from_params({"min": {"clip_score": 0.28}, "max": {"nsfw_score": 0.5}})
    assert not stage.is_global and stage.global_columns == ()
    reasons = stage.process(scored()).column("reject_reason").to_pylist()
    assert reasons == [None, "nsfw_score_above_max", "clip_score_below_min", "clip_score_missing", None, None]


def test_top_fraction_is_a_global_stage() -> None:
    stage = Select.from_params({"top_fraction": {"clip_score": 0.5}, "min": {"clip_score": 0.2}})
    assert type(stage) is Select and stage.is_global and stage.global_columns == ("clip_score",)
    assert pickle.loads(pickle.dumps(stage)).is_global
    assert Select.from_params({"min": {"x": 0}}).global_columns == ()  # one instance's options never reach another
    assert "kind: per-shard stage; global (a ranking over the whole dataset" in stage_markdown("select")
    out = stage.process(scored())
    survivors = out.filter(pc.is_null(out.column("reject_reason"))).select(["key", "clip_score"])
    assert survivors.column("key").to_pylist() == ["a", "b", "e", "f"]
    decision = stage.decide(survivors)
    # Best 2 of 4: e (0.5), then the 0.30 tie broken by key: a before f.
    assert dict(zip(decision.column("key").to_pylist(), decision.column("reject_reason").to_pylist(), strict=True)) == {
        "f": "clip_score_not_top",
        "b": "clip_score_not_top",
    }


def test_several_fractions_reject_independently() -> None:
    t = pa.table({"key": list("abcd"), "x": [4.0, 3.0, 2.0, 1.0], "y": [1, 2, 3, 4]})
    decision = Select.from_params({"top_fraction": {"x": 0.5, "y": 0.75}}).decide(t)
    assert dict(zip(decision.column("key").to_pylist(), decision.column("reject_reason").to_pylist(), strict=True)) == {
        "c": "x_not_top",
        "d": "x_not_top",
        "a": "y_not_top",
    }


@pytest.mark.parametrize(
    "params", [{}, {"min": {"clip_score": "high"}}, {"top_fraction": {"clip_score": 1.5}}, {"top_fraction": {"clip_score": 0}}]
)
def test_bad_options(params: dict) -> None:
    with pytest.raises(UsageError):
        Select.from_params(params)


def test_missing_or_text_column_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no column 'aesthetic'"):
        Select.from_params({"min": {"aesthetic": 5}}).process(scored())
    with pytest.raises(UsageError, match="not numbers"):
        Select.from_params({"min": {"key": 1}}).process(scored())
    with pytest.raises(UsageError, match="not numbers"):
        Select.from_params({"top_fraction": {"key": 0.5}}).process(scored())


def test_nan_counts_as_missing() -> None:
    t = pa.table({"key": ["a", "b"], "x": [float("nan"), 1.0], "reject_reason": pa.nulls(2, pa.string())})
    assert Select.from_params({"max": {"x": 2}}).process(t).column("reject_reason").to_pylist() == ["x_missing", None]


def test_score_once_select_many(tmp_path: Path, photo_dataset: Path, photos: pa.Table, tiny_clip: str) -> None:
    """Score with clip_score in score mode, then select by threshold and by top fraction from the stored column."""
    scored_out = tmp_path / "scored"
    assert run_command("stage", "clip_score", photo_dataset, scored_out, f"model={tiny_clip}", "mode=score", output_format="parquet") == 0
    table = kept(scored_out)
    scores = dict(zip(table.column("key").to_pylist(), table.column("clip_score").to_pylist(), strict=True))
    assert len(scores) == photos.num_rows

    threshold = float(np.median([s for s in scores.values() if s is not None]))
    by_select = tmp_path / "by_select"
    assert run_command("stage", "select", scored_out, by_select, f"min={{clip_score: {threshold}}}") == 0
    by_filter = tmp_path / "by_filter"
    assert run_command("stage", "clip_score", photo_dataset, by_filter, f"model={tiny_clip}", f"min_score={threshold}") == 0
    assert set(kept(by_select).column("key").to_pylist()) == set(kept(by_filter).column("key").to_pylist())
    assert kept(by_select).column("clip_score").null_count == 0  # the stored score travels on

    top = tmp_path / "top"
    assert (
        run_cli(
            "stage",
            "select",
            "--input",
            str(scored_out),
            "--output",
            str(top),
            "--set",
            "top_fraction={clip_score: 0.3}",
            "--rows-per-shard",
            "20",
        )
        == 0
    )
    valid = {k: s for k, s in scores.items() if s is not None}
    best = sorted(valid, key=lambda k: (-valid[k], k))[: round(0.3 * len(valid))]
    assert set(kept(top).column("key").to_pylist()) == set(best)
    reasons = rejects(top)
    assert set(reasons.values()) == {"clip_score_missing", "clip_score_not_top"}
    assert len(reasons) == photos.num_rows - len(best)
