"""Grounded-caption text formats: the caption with each grounded phrase marked up as its consumer reads it.

Each writes ``DEST/{id:05d}.jsonl`` (one ``{"key", "image", "text"}`` object per line; ``image``
is the path relative to DEST) and the images under ``DEST/images/{id:05d}/KEY.EXT``.

| format | phrase with two boxes |
|---|---|
| ``kosmos2`` | ``<phrase>a dog</phrase><object><patch_index_0012><patch_index_0540></delimiter_of_multi_objects/>...</object>`` |
| ``qwen-vl`` | ``<ref>a dog</ref><box>(x1,y1),(x2,y2)</box><box>...</box>``, integers 0-999 |
| ``qwen2-vl`` | ``<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>...``, integers 0-999 |
| ``cogvlm`` | ``a dog [[x0,y0,x1,y1;x0,y0,x1,y1]]``, three digits 000-999 |
| ``florence2`` | ``a dog<loc_x1><loc_y1><loc_x2><loc_y2><loc_...>...``: the phrases only, as Florence-2 answers its |
|  | ``<CAPTION_TO_PHRASE_GROUNDING>`` task, whose prompt (task token + caption) each line carries as ``prompt`` |
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from mmcurate.exports.base import Box, Format, Phrase, Sample, jsonl
from mmcurate.shards.layout import shard_name


class TextFormat(Format):
    """A caption whose grounded phrases are replaced, in place, by :meth:`markup`."""

    def markup(self, phrase: str, boxes: Sequence[Box]) -> str:
        raise NotImplementedError

    def text(self, sample: Sample) -> str:
        parts, at = [], 0
        for p in sorted(sample.phrases, key=lambda p: p.start):
            if p.start < at:  # overlaps the phrase before: left as plain text
                continue
            parts += [sample.caption[at : p.start], self.markup(sample.caption[p.start : p.end], p.boxes)]
            at = p.end
        return "".join([*parts, sample.caption[at:]])

    def target(self, sample: Sample) -> dict[str, Any]:
        return {"target": self.text(sample)}

    def line(self, sample: Sample) -> dict[str, Any]:
        """The JSONL line: ``target`` written as ``text``."""
        fields = self.target(sample)
        return {"key": sample.key, "image": f"images/{sample.image_path}", "text": fields.pop("target"), **fields}

    def write_shard(self, shard_id: int, samples: list[Sample]) -> None:
        self.write_images(samples)
        self.dest.write_bytes(self.dest.path(f"{shard_name(shard_id)}.jsonl"), jsonl(self.line(s) for s in samples))
        self.record(samples)


def _clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)


class Kosmos2(TextFormat):
    """KOSMOS-2 (transformers' Kosmos2Processor): corners as cells of a 32 x 32 grid."""

    name = "kosmos2"
    quantisation = "32x32 grid cells (Kosmos-2 patch indices)"
    # Its post-processing (clean_text_and_extract_entities_with_bboxes) drops every ``<...>`` of the text
    # and reads a phrase as ``[^<]+``; its tokenizer holds <phrase>, <object>, <patch_index_NNNN>...
    reserved = re.compile("<")
    grid = 32

    def cells(self, box: Box) -> tuple[int, int]:
        """Top-left cell floor(x1 * 32), bottom-right cell ceil(x2 * 32 - 1); index y * 32 + x."""
        n = self.grid
        x1, y1, x2, y2 = (_clamp(v) for v in box)
        ul_x, ul_y = min(math.floor(x1 * n), n - 1), min(math.floor(y1 * n), n - 1)
        lr_x, lr_y = max(math.ceil(x2 * n - 1), ul_x), max(math.ceil(y2 * n - 1), ul_y)
        return ul_y * n + ul_x, lr_y * n + lr_x

    def decoded(self, box: Box) -> Box:
        # transformers' patch_index_to_coordinate: whole cells when the corners share a row or a
        # column, cell centres otherwise.
        n, cell = self.grid, 1.0 / self.grid
        ul, lr = self.cells(box)
        (ul_y, ul_x), (lr_y, lr_x) = divmod(ul, n), divmod(lr, n)
        if ul_x == lr_x or ul_y == lr_y:
            return ul_x * cell, ul_y * cell, (lr_x + 1) * cell, (lr_y + 1) * cell
        return (ul_x + 0.5) * cell, (ul_y + 0.5) * cell, (lr_x + 0.5) * cell, (lr_y + 0.5) * cell

    def markup(self, phrase: str, boxes: Sequence[Box]) -> str:
        objects = "</delimiter_of_multi_objects/>".join("<patch_index_{:04d}><patch_index_{:04d}>".format(*self.cells(b)) for b in boxes)
        return f"<phrase>{phrase}</phrase><object>{objects}</object>"


class Thousandths(TextFormat):
    """Corners as integers 0..999: floor(v * 1000), clamped; decoded as ``(q + offset) / 1000``."""

    quantisation = "integers 0-999 (floor of v * 1000)"
    offset = 0.0  # where in its bin the consumer puts a decoded coordinate

    def ints(self, box: Box) -> tuple[int, int, int, int]:
        return tuple(min(math.floor(_clamp(v) * 1000), 999) for v in box)

    def decoded(self, box: Box) -> Box:
        return tuple((q + self.offset) / 1000 for q in self.ints(box))


class QwenVL(Thousandths):
    """Qwen-VL: ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` per box."""

    name = "qwen-vl"
    reserved = re.compile(r"</?(?:ref|box|quad|img)>|<imgpad>|<\|.*?\|>")  # its tokenizer's special tokens

    def markup(self, phrase: str, boxes: Sequence[Box]) -> str:
        return f"<ref>{phrase}</ref>" + "".join("<box>({},{}),({},{})</box>".format(*self.ints(b)) for b in boxes)


class Qwen2VL(Thousandths):
    """Qwen2-VL: object-reference and box special tokens, integers in [0, 1000)."""

    name = "qwen2-vl"
    reserved = re.compile(r"<\|.*?\|>")  # its special tokens: <|object_ref_start|>, <|box_start|>, <|im_end|>...

    def markup(self, phrase: str, boxes: Sequence[Box]) -> str:
        boxes_text = "".join("<|box_start|>({},{}),({},{})<|box_end|>".format(*self.ints(b)) for b in boxes)
        return f"<|object_ref_start|>{phrase}<|object_ref_end|>{boxes_text}"


class CogVLM(Thousandths):
    """CogVLM: ``phrase [[x0,y0,x1,y1;...]]`` with three-digit coordinates."""

    name = "cogvlm"
    reserved = re.compile(r"\[\[|\]\]")  # a box list's brackets

    def markup(self, phrase: str, boxes: Sequence[Box]) -> str:
        return f"{phrase} [[" + ";".join("{:03d},{:03d},{:03d},{:03d}".format(*self.ints(b)) for b in boxes) + "]]"


class Florence2(Thousandths):
    """Florence-2 phrase grounding: the phrases, each followed by its boxes' ``<loc_N>`` tokens (1000 bins)."""

    name = "florence2"
    quantisation = "1000 bins (<loc_0>..<loc_999>, decoded at bin centres)"
    offset = 0.5  # Florence2PostProcessor.dequantize: (bin + 0.5) * size / 1000
    task = "<CAPTION_TO_PHRASE_GROUNDING>"
    # Its post-processor reads a phrase as ``[^<]+``; its processor takes ``<TASK>`` tokens from the
    # prompt; its tokenizer holds <loc_N>, <od>, <poly>...
    reserved = re.compile("<")

    def markup(self, phrase: str, boxes: Sequence[Box]) -> str:
        return phrase + "".join("<loc_{}><loc_{}><loc_{}><loc_{}>".format(*self.ints(b)) for b in boxes)

    def text(self, sample: Sample) -> str:
        """The phrases with their boxes; the plain caption for a row without a box."""
        if not sample.phrases:
            return sample.caption
        phrases: list[Phrase] = sorted(sample.phrases, key=lambda p: p.start)
        return "".join(self.markup(sample.caption[p.start : p.end], p.boxes) for p in phrases)

    def target(self, sample: Sample) -> dict[str, Any]:
        return {**super().target(sample), "prompt": self.task + sample.caption}
