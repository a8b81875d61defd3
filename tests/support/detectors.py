"""Open-vocabulary detectors of the real architectures, built offline with random weights: tiny ones for
the tests, full-size ones for ``bench/grounding.py``.

- OWLv2 with a CLIP tokenizer written from the BPE vocabulary that ships inside open_clip.
- Grounding DINO with a BERT word-piece vocabulary that keeps the ids the model hard-codes
  ([CLS] 101, [SEP] 102, "." 1012, "?" 1029).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

TINY_OWLV2 = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 16,
    },
    "projection_dim": 32,
}
TINY_GROUNDING_DINO = {
    "backbone": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4, "image_size": 128},
    "text": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "model": {
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "num_queries": 30,
        "encoder_n_points": 2,
        "decoder_n_points": 2,
        "max_text_len": 64,
    },
    "size": {"shortest_edge": 128, "longest_edge": 160},
}


def clip_tokenizer(folder: Path) -> Any:
    """A Hugging Face CLIP tokenizer over open_clip's own BPE vocabulary (vocab.json + merges.txt)."""
    import json

    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe) as f:
        merges = [tuple(m.split()) for m in f.read().decode().split("\n")[1 : 49152 - 256 - 2 + 1]]
    units = list(bytes_to_unicode().values())
    vocab = [*units, *(u + "</w>" for u in units), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")


def save_owlv2(folder: Path, tiny: bool = True, tokenizer: Any = None) -> Path:
    """An OWLv2 detector with random weights saved as a local folder: tiny, or OWLv2-B/16 at 960 px;
    ``tokenizer`` (default: :func:`clip_tokenizer`, which needs open_clip) is its CLIP tokenizer."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = tokenizer or clip_tokenizer(folder)
    config = Owlv2Config(**TINY_OWLV2) if tiny else Owlv2Config(vision_config={"image_size": 960})
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    side = config.vision_config.image_size
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": side, "width": side}), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def bert_vocabulary(words: list[str]) -> list[str]:
    """A word-piece vocabulary with BERT's special and punctuation ids where Grounding DINO expects them."""
    fixed = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
    vocab = [fixed.get(i, f"[unused{i}]") for i in range(1030)]
    return vocab + sorted(set(words) - set(vocab))


def save_grounding_dino(folder: Path, words: list[str], tiny: bool = True) -> Path:
    """A Grounding DINO detector with random weights saved as a local folder: tiny, or the Swin-T "tiny" model."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = bert_vocabulary(words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"))
    if tiny:
        t = TINY_GROUNDING_DINO
        backbone = SwinConfig(**t["backbone"], out_features=["stage2", "stage3", "stage4"])
        text = BertConfig(vocab_size=len(vocab), **t["text"])
        config = GroundingDinoConfig(backbone_config=backbone, text_config=text, num_feature_levels=3, **t["model"])
        processor = GroundingDinoImageProcessor(size=t["size"])
    else:
        config = GroundingDinoConfig(text_config=BertConfig(vocab_size=len(vocab)))
        processor = GroundingDinoImageProcessor()
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
