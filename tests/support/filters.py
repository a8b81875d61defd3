"""Helpers of the filter tests: the CLI in this process, reading an output folder back, a tiny open_clip model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmcurate.cli import main
from mmcurate.shards.layout import OutputDir
from mmcurate.shards.writers import OutputSpec, write_shard


def run_cli(*args: str) -> int:
    """``mmcurate ARGS`` in this process, one worker, no progress bar; the exit code."""
    return main([*args, "--workers", "1", "--no-progress"])


def read_parquet_folder(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive") if files else pa.table({})


def kept(out: Path) -> pa.Table:
    """Kept rows of an output (``meta/`` for WebDataset, ``shards/`` for Parquet)."""
    return read_parquet_folder(out / "meta") if (out / "meta").exists() else read_parquet_folder(out / "shards")


def rejects(out: Path) -> dict[str, str]:
    """``{key: reject_reason}`` of an output's rejects."""
    table = read_parquet_folder(out / "rejects")
    return dict(zip(table.column("key").to_pylist(), table.column("reject_reason").to_pylist(), strict=True)) if table.num_rows else {}


def write_dataset(folder: Path, table: pa.Table, shards: int = 2, output_format: str = "parquet") -> Path:
    """``table`` written as an mmcurate output (Parquet shards with image bytes, or WebDataset) that a run can read."""
    out = OutputDir.open(str(folder))
    spec = OutputSpec(str(folder), format=output_format)
    size = -(-table.num_rows // shards)
    for shard in range(shards):
        part = table.slice(shard * size, size)
        write_shard(
            out,
            spec,
            shard,
            part,
            part.column_names,
            {"shard": shard, "rows_in": part.num_rows, "kept": part.num_rows, "rejected": 0, "stages": []},
        )
    return folder


def run_command(command: str, name: str, source: Path, out: Path, *settings: str, output_format: str | None = None) -> int:
    """``mmcurate COMMAND NAME --input SOURCE --output OUT [--set SETTING ...]`` in this process
    (COMMAND: ``stage`` or ``run``); the exit code."""
    args = [command, name, "--input", str(source), "--output", str(out)]
    if output_format is not None:
        args += ["--output-format", output_format]
    for setting in settings:
        args += ["--set", setting]
    return run_cli(*args)


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_clip(folder: Path) -> str:
    """A tiny randomly initialised open_clip ViT saved under ``folder``: ``local-dir:PATH``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    (folder / "mmcurate-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "mmcurate-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("mmcurate-tiny-clip", pretrained=None)
    target = folder / "model"
    target.mkdir()
    (target / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file(model.state_dict(), str(target / "open_clip_model.safetensors"))
    return f"local-dir:{target}"
