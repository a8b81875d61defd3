"""The Ray runner against the local runner: same files per shard id, same stats, resume."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

STAGES = [{"t_words": {"min_words": 5}}, "t_chars", "t_dedup", "t_longest"]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_matches_local(ray_local, test_stages, caption_input, make_pipeline, run_and_read):
    local_summary, local = run_and_read(make_pipeline(caption_input, STAGES, "local"))
    ray_summary, on_ray = run_and_read(make_pipeline(caption_input, STAGES, "ray", engine="ray"))
    assert local_summary["stages"]["t_dedup"]["rejected"] > 50  # exact and near duplicates found
    assert local_summary["stages"]["t_longest"]["rejected"] > 0
    assert sorted(on_ray) == sorted(local)
    for shard_id in local:
        assert on_ray[shard_id] == local[shard_id], f"shard {shard_id} differs"
    assert {k: v for k, v in ray_summary.items() if k != "stages"} == {k: v for k, v in local_summary.items() if k != "stages"}


def test_ray_resumes_a_killed_run(ray_local, test_stages, caption_input, make_pipeline, run_and_read, tmp_path):
    """A run that dies in its second segment, after the global step, resumes to the same output."""
    marker = tmp_path / "crash"
    marker.touch()
    stages = ["t_words", "t_dedup", {"t_crash": {"marker": str(marker)}}]
    pipeline = make_pipeline(caption_input, stages, "resumed", engine="ray")
    with pytest.raises(Exception, match="simulated crash"):
        run_and_read(pipeline)
    done = len(list((tmp_path / "resumed" / "_done").iterdir()))
    assert 0 < done < 9
    marker.unlink()
    _, resumed = run_and_read(pipeline)
    _, local = run_and_read(make_pipeline(caption_input, stages, "local"))
    assert resumed == local
