"""Size and aspect-ratio filters on the source image (``original_width``/``original_height``).

Both read the size of the image as downloaded, before any resizing, so a thumbnail kept at 256 px
still counts as the 2,000 px photo it came from. Where the original size is unknown the stored
``width``/``height`` stand in; a row with neither is rejected as ``image_size_unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mmcurate.filters.common import source_sizes
from mmcurate.options import bounded
from mmcurate.stages.base import Resources, Stage, reject


@dataclass
class ImageSizeConfig:
    min_side: int | None = bounded(None, ge=1)  # shorter side at least this many pixels (DataComp: 200)
    max_side: int | None = bounded(None, ge=1)  # longer side at most this many pixels
    min_area: int | None = bounded(None, ge=1)  # width x height at least this many pixels

    def __post_init__(self) -> None:
        if self.min_side is not None and self.max_side is not None and self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) is larger than max_side ({self.max_side})")


class ImageSize(Stage):
    """Reject images whose shorter side, longer side or area is out of bounds.

    Reasons: ``image_too_small`` (shorter side or area below the minimum), ``image_too_large``,
    ``image_size_unknown``.
    """

    name = "image_size"
    Config = ImageSizeConfig
    resources = Resources(cpus=1)
    needs = ("original_width", "original_height")

    def process(self, batch: pa.Table) -> pa.Table:
        width, height = source_sizes(batch)
        short, long = np.minimum(width, height), np.maximum(width, height)
        c = self.config
        batch = reject(batch, np.isnan(short), "image_size_unknown")
        small = np.zeros(batch.num_rows, dtype=bool)
        if c.min_side is not None:
            small |= short < c.min_side
        if c.min_area is not None:
            small |= width * height < c.min_area
        batch = reject(batch, small, "image_too_small")
        if c.max_side is not None:
            batch = reject(batch, long > c.max_side, "image_too_large")
        return batch


@dataclass
class AspectRatioConfig:
    max_ratio: float | None = bounded(3.0, ge=1)  # longer side / shorter side at most this (DataComp 3, CogVLM 6)
    min_width_ratio: float | None = bounded(None, gt=0)  # width / height at least this (for asymmetric bounds)
    max_width_ratio: float | None = bounded(None, gt=0)  # width / height at most this

    def __post_init__(self) -> None:
        if self.min_width_ratio is not None and self.max_width_ratio is not None and self.min_width_ratio > self.max_width_ratio:
            raise ValueError(f"min_width_ratio ({self.min_width_ratio}) is larger than max_width_ratio ({self.max_width_ratio})")


class AspectRatio(Stage):
    """Reject images that are too elongated: ``extreme_aspect_ratio`` (or ``image_size_unknown``).

    ``max_ratio`` bounds longer / shorter side, both orientations alike (CogVLM's "aspect ratio
    above 6 or below 1/6" is ``max_ratio: 6``); ``min_width_ratio``/``max_width_ratio`` bound
    width / height for asymmetric rules.
    """

    name = "aspect_ratio"
    Config = AspectRatioConfig
    resources = Resources(cpus=1)
    needs = ("original_width", "original_height")

    def process(self, batch: pa.Table) -> pa.Table:
        width, height = source_sizes(batch)
        c = self.config
        known = (width > 0) & (height > 0)
        batch = reject(batch, ~known, "image_size_unknown")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = width / height
        bad = np.zeros(batch.num_rows, dtype=bool)
        if c.max_ratio is not None:
            bad |= np.fmax(ratio, 1 / ratio) > c.max_ratio
        if c.min_width_ratio is not None:
            bad |= ratio < c.min_width_ratio
        if c.max_width_ratio is not None:
            bad |= ratio > c.max_width_ratio
        return reject(batch, bad & known, "extreme_aspect_ratio")
