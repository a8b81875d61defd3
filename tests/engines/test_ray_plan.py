"""How the Ray engine cuts segments into chains and sizes actor pools (no Ray started)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from mmcurate.engines.ray_runner import chains, pool_size
from mmcurate.engines.run import RunContext


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


def test_pool_sizes_follow_declared_resources():
    assert pool_size(1.0, 1.0, {"CPU": 16, "GPU": 4}) == (4, 1.0)
    assert pool_size(1.0, 0.5, {"CPU": 16, "GPU": 2}) == (4, 0.5)
    assert pool_size(1.0, 1.0, {"CPU": 8}) == (8, 0.0)  # no GPU in the cluster: CPU actors
    assert pool_size(2.0, 0.0, {"CPU": 8}) == (4, 0.0)
    assert pool_size(4.0, 0.0, {"CPU": 2}) == (1, 0.0)
