"""The model-stage layer in the engines: device resolution, OOM back-off, the local runner's model
pool (one model copy, torch threads = workers), Spark's refusal."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mmcurate.engines.core import apply_stage, shard_stats, start_ledger
from mmcurate.errors import UsageError
from mmcurate.filters.clip_score import ClipScore
from mmcurate.filters.nsfw import Nsfw
from mmcurate.pipelines.registry import stage_class
from mmcurate.stages import model


@pytest.mark.parametrize(
    ("wanted", "gpus", "device", "gpu_resources"),
    [("auto", 2, "cuda", 1.0), ("auto", 0, "cpu", 0.0), ("cuda", 0, "cpu", 0.0), ("cuda:1", 2, "cuda:1", 1.0), ("cpu", 2, "cpu", 0.0)],
)
def test_device_follows_the_gpus_and_resources_follow_the_device(monkeypatch, wanted, gpus, device, gpu_resources) -> None:
    monkeypatch.setattr(model, "gpu_count", lambda: gpus)  # the CUDA probe
    stage = ClipScore.from_params({"device": wanted})
    assert (stage.device, stage.resources.gpus) == (device, gpu_resources)
    stage.place(0)  # e.g. the Ray driver finds no GPU in its cluster
    assert (stage.device, stage.resources.gpus) == ("cpu", 0.0)
    assert Nsfw().resources.gpus == 0.0  # onnxruntime on the CPU
    with pytest.raises(UsageError):
        ClipScore.from_params({"device": "tpu"})


def test_out_of_memory_halves_the_batch_and_is_counted(test_stages) -> None:
    Probe = stage_class("t_model")
    captions = [f"caption number {i}" * (i % 3 + 1) for i in range(11)]
    table = pa.table({"key": [str(i) for i in range(11)], "caption": captions, "reject_reason": pa.nulls(11, pa.string())})
    table = start_ledger(table.append_column("reject_stage", pa.nulls(11, pa.string())))
    stage = Probe.from_params({"batch_size": 16, "oom_above": 3, "device": "cpu"})
    stage.setup()
    out = apply_stage(stage, table, 0)
    assert out.column("model_chars").to_pylist() == [len(c) for c in captions]
    assert shard_stats(0, out, [stage])["stages"][1]["oom_halvings"] == 2  # 11 rows in one call, then 5, then 2 per call
    again = apply_stage(stage, table, 0)
    assert shard_stats(0, again, [stage])["stages"][1]["oom_halvings"] == 0  # the worker keeps the smaller batch size
    tiny = Probe.from_params({"oom_above": 0, "device": "cpu"})
    tiny.setup()
    with pytest.raises(Exception, match="out of memory"):
        tiny.process(table)  # not even one row fits: the error stands


def test_local_runner_keeps_one_model_copy_beside_the_cpu_pool(test_stages, caption_input, make_pipeline, run_and_read) -> None:
    pipeline = make_pipeline(caption_input, [{"t_model": {"device": "cpu"}}], "pools", rows_per_shard=200)
    pipeline.workers = 2
    summary, result = run_and_read(pipeline)
    kept = [row for shard in result.values() for row in shard["kept"]]
    assert len(result) == 5 and summary["rows_in"] == summary["kept"] + summary["rejected"] and kept
    assert len({row["model_pid"] for row in kept}) == 1  # one model worker served every shard
    assert {row["model_threads"] for row in kept} == {2}  # with the run's cores as torch threads
    assert summary["stages"]["t_model"]["oom_halvings"] >= 1
    assert all(row["model_chars"] == len(row["caption"]) for row in kept)


def test_spark_refuses_a_model_stage(test_stages, caption_input, make_pipeline) -> None:
    pytest.importorskip("pyspark")
    from mmcurate.engines.spark_runner import run_spark

    with pytest.raises(UsageError, match="t_model runs a model: use --engine local or ray"):
        run_spark(make_pipeline(caption_input, ["t_model"], "spark", engine="spark"))


def test_an_uncached_model_offline_is_one_line_before_anything_is_built(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # whatever this machine has cached
    with pytest.raises(UsageError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set") as error:
        ClipScore.from_params({"device": "cpu"}).setup()  # the laion preset's ViT-B-32 + openai
    assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE"):
        model.hf_load(object, "Salesforce/blip-itm-large-coco", stage="capfilt")
