"""The Spark runner against the local runner: same files per shard id, same stats."""

from __future__ import annotations

import pytest

pytest.importorskip("pyspark")

from mmcurate.engines.spark_runner import session  # noqa: E402

pytestmark = pytest.mark.slow

STAGES = [{"t_words": {"min_words": 5}}, "t_chars", "t_dedup", "t_longest"]


@pytest.fixture(scope="module")
def spark():
    spark, _ = session(2)
    yield spark
    spark.stop()


def test_spark_matches_local(spark, test_stages, caption_input, make_pipeline, run_and_read):
    local_summary, local = run_and_read(make_pipeline(caption_input, STAGES, "local"))
    spark_summary, on_spark = run_and_read(make_pipeline(caption_input, STAGES, "spark", engine="spark"))
    assert local_summary["stages"]["t_dedup"]["rejected"] > 50
    assert sorted(on_spark) == sorted(local)
    for shard_id in local:
        assert on_spark[shard_id] == local[shard_id], f"shard {shard_id} differs"


def test_spark_components_match_reference(spark):
    """Min-label propagation over a chain, a star and a pair gives the reference's components."""
    import numpy as np

    from mmcurate.engines.spark_global import components
    from mmcurate.stages.base import components as reference

    a = ["k05", "k04", "k03", "k02", "s0", "s0", "s0", "p1"]
    b = ["k06", "k05", "k04", "k03", "s1", "s2", "s3", "p2"]
    labels = components(spark.createDataFrame(list(zip(a, b, strict=True)), "a string, b string")).filter("node != label").orderBy("node").collect()
    keys, keepers = reference(np.array(a, dtype=object), np.array(b, dtype=object))
    assert [(r["node"], r["label"]) for r in labels] == list(zip(keys, keepers, strict=True))
