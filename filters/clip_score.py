"""CLIP score: cosine similarity of the image and caption embeddings of an open_clip model.

``model`` is an open_clip name with a ``pretrained`` tag or checkpoint file (``ViT-B-32`` +
``openai``, the model LAION filtered with at 0.28), an ``hf-hub:ORG/REPO`` or a
``local-dir:/path`` holding ``open_clip_config.json`` and weights (``pretrained`` is then
ignored). A model without weights is refused; ``pretrained: random`` asks for random ones.
Every row gets ``clip_score``; with ``min_score`` set, rows below it are rejected
(``low_clip_score``). For DataComp's "top 30 %" use ``mode: score`` here and
``select: {top_fraction: {clip_score: 0.3}}`` after it.

A model stage (:mod:`mmcurate.stages.model`): loaded once per worker, images decoded and
preprocessed in ``workers`` threads up to ``prefetch`` batches ahead of the model, bf16 autocast
on a GPU, batches halved on out-of-memory. Rows without an image (``image_missing``), with an
undecodable one (``decode_error``) or without a caption (``caption_missing``) get a null score
and, in filter mode, that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mmcurate.filters.common import Mode, check_mode, store_scores
from mmcurate.options import path_option
from mmcurate.stages.base import reject
from mmcurate.stages.model import ModelConfig, ModelStage, Skip, open_clip_load, row_image


@dataclass
class ClipScoreConfig(ModelConfig):
    model: str = path_option("ViT-B-32")  # open_clip name, hf-hub:ORG/REPO or local-dir:/path
    pretrained: str | None = path_option("openai")  # open_clip pretrained tag or checkpoint file (built-in names only); random: no weights
    min_score: float | None = 0.28  # reject below this; None: score only (LAION-2B-en: 0.28 with ViT-B/32)
    mode: Mode = "filter"
    batch_size: int = 64  # images per forward pass

    def __post_init__(self) -> None:
        super().__post_init__()
        check_mode(self.mode)
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score is a cosine similarity between -1 and 1, not {self.min_score}")


class ClipScore(ModelStage):
    """Score image-caption agreement with CLIP; optionally reject pairs below ``min_score``."""

    name = "clip_score"
    Config = ClipScoreConfig
    needs = ("image", "caption")
    adds = ("clip_score",)

    def load(self) -> None:
        import torch

        c = self.config
        self._model, self._preprocess, self._tokenizer = open_clip_load(c.model, c.pretrained, self.device, self.name)
        self._torch = torch
        self._device = torch.device(self.device)
        self._draft = _input_size(self._preprocess)

    def provenance(self) -> dict[str, Any]:
        return {"model": self.config.model, "pretrained": self.config.pretrained, "device": self.device}

    def prepare(self, row: dict[str, Any]) -> Any:
        """The preprocessed image tensor and the caption, or the reason there is no score."""
        image = row_image(row, self._draft)
        if isinstance(image, Skip):
            return image
        caption = row["caption"].strip() if row["caption"] else ""
        return (self._preprocess(image), caption) if caption else Skip("caption_missing")

    def infer(self, items: list[Any]) -> list[float]:
        torch = self._torch
        images = torch.stack([image for image, _ in items]).to(self._device, non_blocking=True)
        tokens = self._tokenizer([caption for _, caption in items]).to(self._device, non_blocking=True)
        image = torch.nn.functional.normalize(self._model.encode_image(images).float(), dim=-1)
        text = torch.nn.functional.normalize(self._model.encode_text(tokens).float(), dim=-1)
        return (image * text).sum(dim=-1).cpu().tolist()

    def finish(self, batch: pa.Table, outputs: list[Any], reasons: list[str | None]) -> pa.Table:
        scores = np.array([np.nan if s is None else s for s in outputs], dtype=np.float32)
        batch = store_scores(batch, "clip_score", scores, reasons, self.config.mode)
        if self.config.mode == "filter" and self.config.min_score is not None:
            # Compare the stored float32 value, as `select` does when it re-applies the threshold.
            batch = reject(batch, scores.astype(np.float64) < self.config.min_score, "low_clip_score")
        return batch


def _input_size(preprocess: Any) -> tuple[int, int] | None:
    """The (width, height) the model's transform resizes to, for JPEG draft decoding."""
    for t in getattr(preprocess, "transforms", ()):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return (int(size[1]), int(size[0]))
    return None
