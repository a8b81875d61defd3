"""A test model stage, importable by the local runner's spawned worker processes (registered as
``t_model`` by the engine tests' ``test_stages`` fixture)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa

from mmcurate.stages.base import Resources, set_column
from mmcurate.stages.model import ModelConfig, ModelStage


@dataclass
class ProbeConfig(ModelConfig):
    batch_size: int = 16
    oom_above: int = 4  # a "model" that runs out of GPU memory on batches larger than this


class Probe(ModelStage):
    """A model stage whose "model" reports the process and torch threads it runs in, and raises
    torch.cuda.OutOfMemoryError on batches above ``oom_above`` rows."""

    name = "t_model"
    Config = ProbeConfig
    resources = Resources(cpus=0.5, gpus=1, memory_gb=0.5)  # two model pools and the shard chains fit 2 Ray CPUs
    needs = ("caption",)

    def load(self) -> None:
        import torch

        self.torch = torch

    def prepare(self, row: dict) -> object:
        return len(row["caption"] or "")

    def infer(self, items: list) -> list:
        if len(items) > self.config.oom_above:
            raise self.torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return [(os.getpid(), self.torch.get_num_threads(), n) for n in items]

    def finish(self, batch: pa.Table, outputs: list, reasons: list) -> pa.Table:
        for i, name in enumerate(("model_pid", "model_threads", "model_chars")):
            batch = set_column(batch, name, [o[i] for o in outputs], pa.int64())
        return batch
