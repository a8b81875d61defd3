"""Engines move batches between readers, stages and writers; stages never import them."""

from __future__ import annotations

from mmcurate.pipelines.config import Pipeline


def run_pipeline(pipeline: Pipeline, progress: bool = True) -> dict:
    """Run ``pipeline`` on its configured engine and return the run summary."""
    if pipeline.engine == "ray":
        from mmcurate.engines.ray_runner import run_ray

        return run_ray(pipeline, progress=progress)
    if pipeline.engine == "spark":
        from mmcurate.engines.spark_runner import run_spark

        return run_spark(pipeline, progress=progress)
    from mmcurate.engines.local import run_local

    return run_local(pipeline, progress=progress)
