"""Helpers of the capfilt tests: a tiny randomly initialised BLIP captioner and BLIP ITM of the real
architectures with a locally written BERT vocabulary (no hub download), photo tables, reading an
output back by key."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = [
    "a",
    "picture",
    "of",
    "the",
    "dog",
    "cat",
    "man",
    "woman",
    "people",
    "plate",
    "food",
    "pizza",
    "on",
    "with",
    "and",
    "in",
    "at",
    "near",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "small",
    "large",
    "sitting",
    "standing",
    "table",
    "street",
    "car",
    "bus",
    "tree",
    "sky",
    "water",
    "field",
    "grass",
    "building",
    "room",
    "kitchen",
    "bed",
    "boat",
    "train",
]


def write_tiny_blip(folder: Path, seed: int = 0) -> dict[str, str]:
    """Save a tiny BLIP captioner and ITM model (one config, vision 64 px) under ``folder``; their paths."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in WORDS]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS, *letters, ".", ","]) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BlipConfig(
        vision_config={"image_size": 64, "patch_size": 16, **small},
        text_config={
            "vocab_size": len(tokenizer),
            "encoder_hidden_size": 32,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
            "pad_token_id": 0,
            "sep_token_id": 3,
            "max_position_embeddings": 64,
            **small,
        },
        projection_dim=32,
    )
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer)
    paths = {}
    for name, cls in (("captioner", BlipForConditionalGeneration), ("itm", BlipForImageTextRetrieval)):
        torch.manual_seed(seed)
        cls(config).save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def write_tiny_git(folder: Path, vocab: Path) -> str:
    """Save a tiny GIT captioner (a decoder-only one, 32 px) under ``folder`` with the BERT vocabulary ``vocab``; its path."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = BertTokenizer(str(vocab))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = GitConfig(
        vision_config={**small, "image_size": 32, "patch_size": 16},
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=0,
        **small,
    )
    torch.manual_seed(0)
    GitForCausalLM(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def read_rows(out: Path) -> dict[str, dict]:
    """Every row of an output, kept (meta/) and rejected, by key."""
    rows = {}
    for folder in ("meta", "rejects"):
        for path in sorted((out / folder).glob("*.parquet")):
            rows.update({row["key"]: row for row in pq.read_table(path).to_pylist()})
    return rows


def photo_table(jpeg_photos: list[dict], photo_dir: Path, n: int) -> pa.Table:
    rows = jpeg_photos[:n]
    return pa.table(
        {
            "key": [r["file"].rsplit(".", 1)[0] for r in rows],
            "image": [(photo_dir / r["file"]).read_bytes() for r in rows],
            "caption": [r["caption_if_known"] or None for r in rows],
            "reject_reason": pa.nulls(n, pa.string()),
        }
    )
