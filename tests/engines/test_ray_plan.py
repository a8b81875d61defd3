"""How the Ray engine cuts segments into chains and sizes actor pools (no Ray started)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from mmcurate.engines.ray_runner import chains, pool_limits, pool_size
from mmcurate.engines.run import RunContext
from mmcurate.errors import UsageError
from mmcurate.pipelines.config import apply_overrides, parse_pipeline


def test_segments_are_cut_at_gpu_stages(test_stages, caption_input, make_pipeline):
    ctx = RunContext.create(make_pipeline(caption_input, ["t_words", "t_chars", "t_gpu", "t_dedup", "t_longest"], "plan", engine="ray"))
    first = chains(ctx, 0)
    assert [[s.name for s, _ in c.stages] for c in first] == [["t_words", "t_chars"], ["t_gpu"], ["t_dedup"]]
    assert [(c.read, c.write, c.stateful, c.gpus) for c in first] == [
        (True, False, True, 0),
        (False, False, True, 1),
        (False, True, False, 0),
    ]
    assert [position for c in first for _, position in c.stages] == [0, 1, 2, 3]
    second, third = chains(ctx, 1), chains(ctx, 2)
    assert [(c.read, c.write, c.applies, [s.name for s, _ in c.stages]) for c in second] == [(True, True, 3, ["t_longest"])]
    assert [(c.read, c.write, c.applies, c.stages) for c in third] == [(True, True, 4, [])]


def test_a_model_stage_has_a_chain_on_each_side(test_stages, caption_input, make_pipeline):
    """The chain before a model stage numbers its shards' rows for the pieces; the one after makes
    them shards again (between two model stages, a chain of no stages does both)."""
    stages = ["t_words", {"t_model": {"device": "cpu"}}, {"t_model": {"device": "cpu"}}, "t_gpu"]
    steps = chains(RunContext.create(make_pipeline(caption_input, stages, "plan", engine="ray")), 0)
    assert [[s.name for s, _ in c.stages] for c in steps] == [["t_words"], ["t_model"], [], ["t_model"], [], ["t_gpu"], []]
    model, split = [c.model is not None for c in steps], [c.split for c in steps]
    assert model == [False, True, False, True, False, False, False] and split == [True, False, True, False, False, False, False]


def test_pool_sizes_follow_declared_resources():
    assert pool_size(1.0, 1.0, {"CPU": 16, "GPU": 4}) == (4, 1.0)
    assert pool_size(1.0, 0.5, {"CPU": 16, "GPU": 2}) == (4, 0.5)
    assert pool_size(1.0, 1.0, {"CPU": 8}) == (8, 0.0)  # no GPU in the cluster: CPU actors
    assert pool_size(2.0, 0.0, {"CPU": 8}) == (4, 0.0)
    assert pool_size(4.0, 0.0, {"CPU": 2}) == (1, 0.0)


def test_actor_pools_grow_with_the_cluster_within_min_and_max_actors():
    """(least, initial, most): a pool starts at its planned size and has no upper limit unless max_actors sets one."""
    assert pool_limits(4, None, None) == (4, 4, None)  # grows with the cluster as nodes join
    assert pool_limits(1, None, None) == (1, 1, None)  # a CPU pool beside GPU pools starts from one actor
    assert pool_limits(4, 2, None) == (2, 4, None)
    assert pool_limits(4, None, 3) == (3, 3, 3)  # max_actors caps the planned start as well
    assert pool_limits(1, 2, 8) == (2, 2, 8)


def test_min_and_max_actors_are_pipeline_options(caption_input, tmp_path):
    data = {"input": {"path": str(caption_input)}, "output": {"path": str(tmp_path / "out")}, "stages": ["caption_quality"]}
    pipeline = apply_overrides(parse_pipeline({**data, "engine": "ray", "min_actors": 2}), ["max_actors=8"])
    assert (pipeline.min_actors, pipeline.max_actors) == (2, 8)
    with pytest.raises(UsageError, match="min_actors"):
        apply_overrides(pipeline, ["min_actors=9"])
    with pytest.raises(UsageError, match="max_actors"):
        parse_pipeline({**data, "max_actors": 0})
