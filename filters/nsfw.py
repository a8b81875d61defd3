"""NSFW score from the NudeNet detector (``pip install mmcurate[nsfw]``).

``nsfw_score`` is the highest confidence among the detector's exposed-body-part classes in
``classes`` (0 when none is found; NudeNet reports detections from 0.2 up), so it is
high only when the detector finds exposed genitalia, breasts, buttocks or anus. With ``max_score``
set, rows above it are rejected as ``nsfw``; ``mode: score`` only tags (as LAION did).
Rows without an image or with an undecodable one get a null score (``image_missing``,
``decode_error``).

The model, ``320n.onnx`` (a YOLOv8n detector at 320 px), ships inside the ``nudenet`` wheel and
runs offline with onnxruntime.

License: the ``nudenet`` 3.4.2 wheel's metadata says MIT, but the LICENSE files inside the wheel
and the upstream repository (github.com/notAI-tech/NudeNet) are **AGPL-3.0**, and the maintainer
has said the YOLOv8-based model has to be AGPL (NudeNet issues #177, #119). mmcurate itself is
Apache-2.0 and only imports nudenet, lazily, from this optional stage; whoever installs the ``nsfw``
extra and distributes or serves a product built on it must check the AGPL-3.0 obligations.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.filters.common import Mode, check_mode, decode_image, prepared_batches, store_scores
from mmcurate.stages.base import Resources, Stage, reject

EXPOSED = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
_INPUT = 320  # the detector's input size


@dataclass
class NsfwConfig:
    max_score: float | None = 0.5  # reject images scoring above this; None: score only
    classes: tuple[str, ...] = EXPOSED  # detector classes that count towards the score
    mode: Mode = "filter"
    batch_size: int = 8  # images per detector run
    workers: int = 2  # threads decoding images

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.max_score is not None and not 0.0 <= self.max_score <= 1.0:
            raise ValueError(f"max_score is a confidence between 0 and 1, not {self.max_score}")
        if not self.classes:
            raise ValueError("classes must name at least one detector class")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError("batch_size and workers must be at least 1")


def _bgr(data: bytes | None) -> Any:
    """The image as the BGR array NudeNet expects, or the reason there is none."""
    if data is None:
        return "image_missing"
    image = decode_image(data, draft=(_INPUT, _INPUT))
    return "decode_error" if image is None else np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


class Nsfw(Stage):
    """Score nudity with NudeNet; optionally reject images above ``max_score``."""

    name = "nsfw"
    Config = NsfwConfig
    resources = Resources(cpus=1, memory_gb=0.5)
    needs = ("image",)
    adds = ("nsfw_score",)

    def setup(self) -> None:
        try:
            from nudenet import NudeDetector
        except ImportError as e:
            raise UsageError(f"nsfw needs {e.name}: pip install 'mmcurate[nsfw]'") from None

        self._detector = NudeDetector()
        self._classes = set(self.config.classes)

    def score(self, images: list[bytes | None]) -> tuple[np.ndarray, list[str | None]]:
        """NSFW score per image (NaN where there is none) and the reason for each missing score."""
        n = len(images)
        scores = np.full(n, np.nan, dtype=np.float32)
        reasons: list[str | None] = [None] * n
        with ThreadPoolExecutor(self.config.workers) as pool:
            for batch in prepared_batches(pool, _bgr, images, self.config.batch_size, ahead=2):
                decoded = []
                for i, item in batch:
                    if isinstance(item, str):
                        reasons[i] = item
                    else:
                        decoded.append((i, item))
                found = self._detector.detect_batch([item for _, item in decoded], batch_size=self.config.batch_size) if decoded else []
                for (i, _), detections in zip(decoded, found, strict=True):
                    scores[i] = max((d["score"] for d in detections if d["class"] in self._classes), default=0.0)
        return scores, reasons

    def process(self, batch: pa.Table) -> pa.Table:
        scores, reasons = self.score(batch.column("image").to_pylist())
        batch = store_scores(batch, "nsfw_score", scores, reasons, self.config.mode)
        if self.config.mode == "filter" and self.config.max_score is not None:
            batch = reject(batch, scores.astype(np.float64) > self.config.max_score, "nsfw")
        return batch
