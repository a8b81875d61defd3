"""CLIP score: cosine similarity of the image and caption embeddings of an open_clip model.

``model`` is an open_clip name with a ``pretrained`` tag or checkpoint file (``ViT-B-32`` +
``openai``, the model LAION filtered with at 0.28), an ``hf-hub:ORG/REPO`` or a
``local-dir:/path`` holding ``open_clip_config.json`` and weights (``pretrained`` is then
ignored). Every row gets ``clip_score``; with ``min_score`` set, rows below it are rejected
(``low_clip_score``). For DataComp's "top 30 %" use ``mode: score`` here and
``select: {top_fraction: {clip_score: 0.3}}`` after it.

The model is loaded once per worker. Images are decoded and preprocessed in a thread pool, up to
``prefetch`` batches ahead of the model, so the model is not starved; inference runs in
``torch.inference_mode`` with bf16 autocast on a GPU. Rows without an image (``image_missing``),
with an undecodable one (``decode_error``) or without a caption (``caption_missing``) get a
null score and, in filter mode, that reason.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.filters.common import Mode, check_mode, decode_image, prepared_batches, store_scores
from mmcurate.stages.base import Resources, Stage, reject


@dataclass
class ClipScoreConfig:
    model: str = "ViT-B-32"  # open_clip name, hf-hub:ORG/REPO or local-dir:/path
    pretrained: str | None = "openai"  # open_clip pretrained tag or checkpoint file (built-in names only)
    min_score: float | None = 0.28  # reject below this; None: score only (LAION-2B-en: 0.28 with ViT-B/32)
    mode: Mode = "filter"
    batch_size: int = 64  # images per forward pass
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1 ...
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on the CPU
    workers: int = 4  # threads decoding and preprocessing images
    prefetch: int = 2  # batches prepared ahead of the model

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score is a cosine similarity between -1 and 1, not {self.min_score}")
        for name in ("batch_size", "workers", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


class ClipScore(Stage):
    """Score image-caption agreement with CLIP; optionally reject pairs below ``min_score``."""

    name = "clip_score"
    Config = ClipScoreConfig
    needs = ("image", "caption")
    adds = ("clip_score",)

    def __init__(self, config: ClipScoreConfig | None = None) -> None:
        super().__init__(config)
        on_gpu = self.config.device.startswith("cuda")
        self.resources = Resources(cpus=1, gpus=1.0 if on_gpu else 0.0, memory_gb=2.0)

    def setup(self) -> None:
        try:
            import open_clip
            import torch
        except ImportError as e:
            raise UsageError(f"clip_score needs {e.name}: pip install 'mmcurate[models]'") from None

        c = self.config
        device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(c.model, pretrained=c.pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(c.model)
        except (RuntimeError, ValueError, OSError) as e:
            raise UsageError(f"clip_score: cannot load open_clip model {c.model!r} (pretrained {c.pretrained!r}): {e}") from None
        self._torch = torch
        self._model = model.eval()
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self._device = torch.device(device)
        bf16 = c.precision == "bf16" or (c.precision == "auto" and self._device.type == "cuda")
        self._autocast = {"device_type": self._device.type, "dtype": torch.bfloat16, "enabled": bf16}
        self._draft = _input_size(preprocess)

    def _prepare(self, data: bytes | None) -> Any:
        """The preprocessed image tensor, or the reason there is none."""
        if data is None:
            return "image_missing"
        image = decode_image(data, self._draft)
        return "decode_error" if image is None else self._preprocess(image)

    def score(self, images: list[bytes | None], captions: list[str | None]) -> tuple[np.ndarray, list[str | None]]:
        """CLIP score per pair (NaN where there is none) and the reason for each missing score."""
        torch = self._torch
        n = len(images)
        scores = np.full(n, np.nan, dtype=np.float32)
        reasons: list[str | None] = [None] * n
        with ThreadPoolExecutor(self.config.workers) as pool:
            for batch in prepared_batches(pool, self._prepare, images, self.config.batch_size, self.config.prefetch):
                rows, tensors, texts = [], [], []
                for i, item in batch:
                    caption = captions[i].strip() if captions[i] else ""
                    if isinstance(item, str) or not caption:
                        reasons[i] = item if isinstance(item, str) else "caption_missing"
                        continue
                    rows.append(i)
                    tensors.append(item)
                    texts.append(caption)
                if rows:
                    scores[rows] = self._similarity(torch.stack(tensors), self._tokenizer(texts))
        return scores, reasons

    def _similarity(self, images: Any, tokens: Any) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode(), torch.autocast(**self._autocast):
            image = self._model.encode_image(images.to(self._device, non_blocking=True))
            text = self._model.encode_text(tokens.to(self._device, non_blocking=True))
            image = torch.nn.functional.normalize(image.float(), dim=-1)
            text = torch.nn.functional.normalize(text.float(), dim=-1)
            return (image * text).sum(dim=-1).cpu().numpy()

    def process(self, batch: pa.Table) -> pa.Table:
        scores, reasons = self.score(batch.column("image").to_pylist(), batch.column("caption").to_pylist())
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
