"""NSFW score from the NudeNet detector (``pip install mmcurate[nsfw]``).

``nsfw_score`` is the highest confidence among the detector's exposed-body-part classes in
``classes`` (NudeNet's class names, in any case; 0 when none is found; NudeNet reports detections
from 0.2 up), so it is high only when the detector finds exposed genitalia, breasts, buttocks or anus. With ``max_score``
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

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mmcurate.filters.common import Mode, check_mode, store_scores
from mmcurate.stages.base import Resources, reject
from mmcurate.stages.model import ModelStage, Skip, require, row_image

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
        self.classes = tuple(name.upper() for name in self.classes)  # NudeNet's names are upper case; any case is accepted
        labels = detector_labels()
        unknown = [name for name in self.classes if labels is not None and name not in labels]
        if unknown:
            raise ValueError(f"classes: NudeNet has no class {unknown[0]!r} (its classes: {', '.join(sorted(labels))})")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError("batch_size and workers must be at least 1")


def detector_labels() -> tuple[str, ...] | None:
    """The classes NudeNet's detector reports, from the installed package's own list; None without it."""
    try:
        module = importlib.import_module("nudenet.nudenet")
    except ImportError:
        return None  # the stage's load() names the extra to install
    labels = vars(module).get("__labels")
    return tuple(labels) if labels else None


class Nsfw(ModelStage):
    """Score nudity with NudeNet; optionally reject images above ``max_score``.

    A model stage (:mod:`mmcurate.stages.model`) on the CPU (onnxruntime): images are decoded in
    ``workers`` threads ahead of the detector, which sees ``batch_size`` images per run."""

    name = "nsfw"
    Config = NsfwConfig
    resources = Resources(cpus=1, memory_gb=0.5)
    uses_torch = False
    needs = ("image",)
    adds = ("nsfw_score",)

    def load(self) -> None:
        self._detector = require("nudenet", self.name, "nsfw").NudeDetector()
        self._classes = set(self.config.classes)

    def prepare(self, row: dict[str, Any]) -> Any:
        """The image as the BGR array NudeNet expects, or the reason there is none."""
        image = row_image(row, draft=(_INPUT, _INPUT))
        return image if isinstance(image, Skip) else np.ascontiguousarray(np.asarray(image)[:, :, ::-1])

    def infer(self, items: list[Any]) -> list[float]:
        found = self._detector.detect_batch(items, batch_size=len(items))
        return [max((d["score"] for d in detections if d["class"] in self._classes), default=0.0) for detections in found]

    def score(self, images: list[bytes | None]) -> tuple[np.ndarray, list[str | None]]:
        """NSFW score per image (NaN where there is none) and the reason for each missing score."""
        outputs, reasons = self.run(pa.table({"image": pa.array(images, pa.binary())}))
        return np.array([np.nan if s is None else s for s in outputs], dtype=np.float32), reasons

    def finish(self, batch: pa.Table, outputs: list[Any], reasons: list[str | None]) -> pa.Table:
        scores = np.array([np.nan if s is None else s for s in outputs], dtype=np.float32)
        batch = store_scores(batch, "nsfw_score", scores, reasons, self.config.mode)
        if self.config.mode == "filter" and self.config.max_score is not None:
            batch = reject(batch, scores.astype(np.float64) > self.config.max_score, "nsfw")
        return batch
