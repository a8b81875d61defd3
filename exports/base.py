"""What every export format shares: the samples it receives, the files it writes, its quantisation error.

A format is a :class:`Format` subclass registered by ``name``. :func:`mmcurate.exports.export`
streams the source output shard by shard and hands each shard's :class:`Sample` list to
``write_shard``; ``finish`` closes what spans shards. ``target`` gives what a format writes per
sample, which the writer lays out and :class:`mmcurate.loaders.CuratedDataset` hands to training.
Formats that quantise boxes decode each box as their consumer does (``decoded``), and the mean and
lowest IoU between the boxes and their decoded versions go to ``export.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from mmcurate.shards.layout import OutputDir, shard_name

Box = tuple[float, float, float, float]

# LLaVA's brief image-description instructions (LLaVA paper, Table 8), for the human turn.
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)


@dataclass(frozen=True)
class ExportOptions:
    """Choices of one export: the least boxes a row needs (None: the format's own default), the
    instructions to draw from and the seed of that draw."""

    min_boxes: int | None = None
    instructions: tuple[str, ...] = BRIEF_INSTRUCTIONS
    seed: int = 0


@dataclass(frozen=True)
class Phrase:
    """A grounded phrase of a caption: character spans, boxes (xyxy in [0, 1]) and their scores."""

    text: str
    start: int
    end: int
    expression_start: int
    expression_end: int
    boxes: tuple[Box, ...]
    scores: tuple[float, ...]


@dataclass(frozen=True)
class Sample:
    """One row of the source output, as the formats see it."""

    shard_id: int
    key: str
    url: str | None
    caption: str
    width: int | None
    height: int | None
    image: bytes | None
    image_format: str | None
    phrases: tuple[Phrase, ...]

    @property
    def num_boxes(self) -> int:
        return sum(len(p.boxes) for p in self.phrases)

    @property
    def spans_match(self) -> bool:
        """Whether each phrase's span holds its text in the caption, inside its expression's span, inside
        the caption: false when a stage rewrote the caption after the spans were taken from it."""
        n = len(self.caption)
        return all(
            0 <= p.expression_start <= p.start < p.end <= p.expression_end <= n and self.caption[p.start : p.end] == p.text
            for p in self.phrases
        )

    @property
    def image_path(self) -> str:
        """The image's path under the image folder: ``{shard:05d}/KEY.EXT``."""
        return f"{shard_name(self.shard_id)}/{self.key}.{self.image_format or 'jpg'}"


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two ``(n, 4)`` arrays of xyxy boxes."""
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)


@dataclass
class Counts:
    """What an export wrote and skipped, and the IoU of its quantised boxes."""

    shards: int = 0
    rows: int = 0
    phrases: int = 0
    boxes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    iou_sum: float = 0.0
    iou_min: float = 1.0
    iou_count: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def report(self) -> dict[str, Any]:
        quantisation = {"boxes": self.iou_count, "mean_iou": self.iou_sum / self.iou_count if self.iou_count else None}
        quantisation["min_iou"] = self.iou_min if self.iou_count else None
        return {
            "shards": self.shards,
            "rows": self.rows,
            "phrases": self.phrases,
            "boxes": self.boxes,
            "skipped": self.skipped,
            "quantisation": quantisation,
        }


class Format:
    """One export format. Subclasses set ``name`` and implement ``write_shard``; a format whose file
    spans shards opens it in ``begin`` (into ``self.files``) and ends it in ``finish``. Used as a
    context manager: ``finish`` runs only when every shard was written."""

    name: ClassVar[str]
    min_boxes: ClassVar[int] = 1  # rows with fewer boxes are skipped (too_few_boxes)
    needs_image: ClassVar[bool] = True  # rows without an image are skipped (image_missing)
    quantisation: ClassVar[str] = "none"  # how boxes are quantised, for export.json
    grounded: ClassVar[bool] = True  # writes grounded phrases: needs the grounding column and spans that index the caption
    # What the format's consumer reads as markup in the text it is given (its parser's syntax, its
    # tokenizer's special tokens): rows whose caption holds it are skipped (reserved_markup), not escaped.
    reserved: ClassVar[re.Pattern[str] | None] = None

    def __init__(self, dest: OutputDir, options: ExportOptions) -> None:
        self.dest = dest
        self.options = options
        self.counts = Counts()
        self.files = contextlib.ExitStack()

    def __enter__(self) -> Format:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.files.__enter__()
        self.begin()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> bool | None:
        if kind is None:
            self.finish()
        return self.files.__exit__(kind, error, traceback)

    def decoded(self, box: Box) -> Box:
        """``box`` after this format's quantisation, decoded as its consumer decodes it."""
        return box

    def target(self, sample: Sample) -> dict[str, Any]:
        """What this format writes for ``sample`` besides its key and image: ``target``, the text a
        model learns to produce, and the format's other fields (``prompt``, the model's input text,
        where it has one). The writer writes these; the loader's ``grounding=`` gives them per sample."""
        raise NotImplementedError

    def refusal(self, sample: Sample) -> str | None:
        """Why ``sample`` cannot be written as it is, the reason it is skipped: ``span_mismatch`` (its
        phrases' spans do not index its caption) or ``reserved_markup`` (its caption holds text the
        consumer would read as markup); None when it can."""
        if self.grounded and not sample.spans_match:
            return "span_mismatch"
        if self.reserved is not None and self.reserved.search(sample.caption):
            return "reserved_markup"
        return None

    def write_shard(self, shard_id: int, samples: list[Sample]) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        """Open what spans shards (a single output file)."""

    def finish(self) -> None:
        """End what spans shards."""

    def record(self, samples: list[Sample]) -> None:
        """Count the samples written and the IoU of their boxes with their decoded versions."""
        boxes = [b for s in samples for p in s.phrases for b in p.boxes]
        self.counts.rows += len(samples)
        self.counts.phrases += sum(len(s.phrases) for s in samples)
        self.counts.boxes += len(boxes)
        if boxes:
            overlap = iou(np.array(boxes, dtype=np.float64), np.array([self.decoded(b) for b in boxes], dtype=np.float64))
            self.counts.iou_sum += float(overlap.sum())
            self.counts.iou_min = min(self.counts.iou_min, float(overlap.min()))
            self.counts.iou_count += len(boxes)

    def write_images(self, samples: list[Sample], folder: str = "images") -> None:
        for s in samples:
            self.dest.write_bytes(self.dest.path(folder, s.image_path), s.image)

    def instruction(self, key: str) -> str:
        """An instruction from the configured list, drawn by a hash of the seed and the key."""
        digest = hashlib.sha256(f"{self.options.seed}\0{key}".encode()).digest()
        return self.options.instructions[int.from_bytes(digest[:8], "big") % len(self.options.instructions)]


def jsonl(records: Iterator[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
