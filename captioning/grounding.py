"""Grounding: boxes for the noun phrases in ``grounding`` (KOSMOS-2's GRIT recipe, steps 2, 3 and 5).

Run ``noun_phrases`` first. An open-vocabulary detector from transformers finds each phrase in the
image: ``detector`` is a Hugging Face id (``revision`` pins it) or a local folder, its architecture
read from its config.json: OWLv2 (``google/owlv2-base-patch16-ensemble``, the default) or Grounding
DINO / MM Grounding DINO (``IDEA-Research/grounding-dino-tiny``,
``openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg_v3det``).

- Each detected box goes to the phrase that scores it highest; a box must score above ``threshold``
  (default per detector: 0.1 for OWLv2, 0.35 for Grounding DINO, their authors' settings).
- Non-maximum suppression across phrases: of two boxes overlapping by more than ``nms_iou``, the
  lower-scoring one goes even when it belongs to another phrase.
- Boxes are xyxy normalised to [0, 1] of the stored image; degenerate ones (x1 <= x0 or y1 <= y0
  after clipping) are dropped, and so are phrases left without a box. ``num_boxes`` counts the rest.
- A row with fewer than ``min_boxes`` boxes is rejected ``no_grounding`` (kept under ``mode: score``);
  rows without an image (``image_missing``) or with an undecodable one (``decode_error``) too.
- Images are batched (``batch_size``) with their phrase lists padded to the longest in the batch; at
  most ``max_phrases`` phrases of a row, the first ones, are sent to the detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.options import bounded, path_option
from mmcurate.schemas import BY_NAME
from mmcurate.stages.base import reject, set_column
from mmcurate.stages.model import ModelConfig, ModelStage, Skip, hf_load, require, row_image

# (phrase index, xyxy box normalised to the image, score) of one detection
Detection = tuple[int, tuple[float, float, float, float], float]


@dataclass
class GroundingConfig(ModelConfig):
    detector: str = path_option("google/owlv2-base-patch16-ensemble")  # Hugging Face id or local folder (OWLv2, Grounding DINO)
    revision: str | None = None  # pin the detector (a commit, tag or branch)
    threshold: float | None = bounded(None, ge=0, le=1)  # box score; None: the detector's default (OWLv2 0.1, Grounding DINO 0.35)
    nms_iou: float = bounded(0.5, gt=0, le=1)  # NMS across phrases: drop the weaker of two boxes overlapping more than this
    min_boxes: int = bounded(1, ge=0)  # rows with fewer boxes are rejected no_grounding
    max_phrases: int = bounded(16, ge=1)  # phrases per row sent to the detector (the first ones)
    mode: Literal["filter", "score"] = "filter"
    batch_size: int = 8  # images per model call


class Detector:
    """An open-vocabulary detector family: CPU preparation of one image with its phrases, one batched call."""

    threshold: ClassVar[float]

    def __init__(self, model: Any, processor: Any, device: str, dtype: Any) -> None:
        self.torch = require("torch", "grounding")
        self.model = model.to(device, dtype).eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype

    @property
    def draft(self) -> tuple[int, int] | None:
        """The size the image processor resizes to, for JPEG draft decoding (a free downscale)."""
        size = getattr(self.processor.image_processor, "size", None) or {}
        side = size.get("height") or size.get("shortest_edge")
        return (side, side) if side else None

    def prepare(self, image: Any, phrases: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def detect(self, items: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per item: (phrase index, xyxy box normalised to its image, score) arrays of the candidate boxes."""
        raise NotImplementedError

    def xyxy(self, boxes: Any) -> Any:
        """Centre-size boxes (the detectors' output) as corner boxes."""
        cx, cy, w, h = boxes.unbind(-1)
        return self.torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


class Owlv2(Detector):
    """OWLv2: every image patch proposes a box, scored against each phrase as a text query. The image
    is padded to a square (bottom and right), so boxes are rescaled to the image itself."""

    threshold = 0.1

    def prepare(self, image: Any, phrases: list[str]) -> dict[str, Any]:
        pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        length = self.model.config.text_config.max_position_embeddings
        text = self.processor.tokenizer(phrases, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        side = max(image.size)
        return {
            "pixels": pixels,
            "ids": text["input_ids"],
            "mask": text["attention_mask"],
            "scale": (side / image.size[0], side / image.size[1]),
        }

    def detect(self, items: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        torch = self.torch
        queries = max(len(it["ids"]) for it in items)
        length = items[0]["ids"].shape[1]
        pad = self.processor.tokenizer.pad_token_id or 0
        ids = torch.full((len(items), queries, length), pad, dtype=torch.long)
        mask = torch.zeros((len(items), queries, length), dtype=torch.long)
        valid = torch.zeros((len(items), queries), dtype=torch.bool)
        for i, it in enumerate(items):
            n = len(it["ids"])
            ids[i, :n], mask[i, :n], valid[i, :n] = it["ids"], it["mask"], True
        mask[:, :, 0] = 1  # padding queries attend to their first token: no empty attention rows
        out = self.model(
            input_ids=ids.view(-1, length).to(self.device),
            attention_mask=mask.view(-1, length).to(self.device),
            pixel_values=torch.stack([it["pixels"] for it in items]).to(self.device, self.dtype),
        )
        logits = out.logits.float().masked_fill(~valid[:, None, :].to(self.device), float("-inf"))
        scores, labels = torch.sigmoid(logits).max(dim=-1)
        boxes = self.xyxy(out.pred_boxes.float())
        results = []
        for i, it in enumerate(items):
            sx, sy = it["scale"]
            b = (boxes[i] * boxes.new_tensor([sx, sy, sx, sy])).cpu().numpy()
            results.append((labels[i].cpu().numpy(), b, scores[i].cpu().numpy()))
        return results


class GroundingDino(Detector):
    """Grounding DINO / MM Grounding DINO: the phrases joined as ``"a dog . a couch ."``; a query's
    score for a phrase is the highest of its tokens' scores."""

    threshold = 0.35

    def prepare(self, image: Any, phrases: list[str]) -> dict[str, Any]:
        encoded = self.processor.image_processor(images=image, return_tensors="pt")
        text, spans = "", []
        for phrase in phrases:
            start = len(text)
            text += phrase.lower().strip()
            spans.append((start, len(text)))
            text += " . "
        limit = getattr(self.model.config, "max_text_len", 256)
        tokens = self.processor.tokenizer(text.strip(), return_offsets_mapping=True, truncation=True, max_length=limit)
        offsets = tokens["offset_mapping"]
        positions = [[t for t, (a, b) in enumerate(offsets) if b > a >= start and b <= end] for start, end in spans]
        return {"pixels": encoded["pixel_values"][0], "ids": tokens["input_ids"], "positions": positions}

    def detect(self, items: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        torch = self.torch
        height = max(it["pixels"].shape[1] for it in items)
        width = max(it["pixels"].shape[2] for it in items)
        pixels = torch.zeros((len(items), 3, height, width))
        pixel_mask = torch.zeros((len(items), height, width), dtype=torch.long)
        length = max(len(it["ids"]) for it in items)
        ids = torch.zeros((len(items), length), dtype=torch.long)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for i, it in enumerate(items):
            _, h, w = it["pixels"].shape
            pixels[i, :, :h, :w], pixel_mask[i, :h, :w] = it["pixels"], 1
            ids[i, : len(it["ids"])], attention[i, : len(it["ids"])] = torch.tensor(it["ids"]), 1
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=attention.to(self.device),
            token_type_ids=torch.zeros_like(ids).to(self.device),
            pixel_values=pixels.to(self.device, self.dtype),
            pixel_mask=pixel_mask.to(self.device),
        )
        token_scores = torch.sigmoid(out.logits.float())
        boxes = self.xyxy(out.pred_boxes.float()).cpu().numpy()
        results = []
        for i, it in enumerate(items):
            per_phrase = [
                token_scores[i, :, p].max(dim=-1).values if p else token_scores.new_zeros(token_scores.shape[1]) for p in it["positions"]
            ]
            scores, labels = torch.stack(per_phrase, dim=-1).max(dim=-1)
            results.append((labels.cpu().numpy(), boxes[i], scores.cpu().numpy()))
        return results


DETECTORS: dict[str, type[Detector]] = {"owlv2": Owlv2, "grounding-dino": GroundingDino, "mm-grounding-dino": GroundingDino}


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.clip(np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]), 0, None)
        overlap = w * h / np.maximum(area[best] + area[rest] - w * h, 1e-12)
        order = rest[overlap <= iou]
    return np.array(keep, dtype=np.int64)


def select_boxes(labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray, threshold: float, nms_iou: float) -> list[Detection]:
    """Candidates scoring above ``threshold``, clipped to [0, 1], non-degenerate, after NMS across phrases."""
    boxes = np.clip(boxes, 0.0, 1.0)
    ok = (scores > threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    labels, boxes, scores = labels[ok], boxes[ok], scores[ok]
    keep = nms(boxes, scores, nms_iou)
    return [(int(labels[k]), tuple(float(v) for v in boxes[k]), float(scores[k])) for k in keep]


class Grounding(ModelStage):
    """Boxes for the noun phrases of ``grounding`` from OWLv2 or Grounding DINO, NMS across phrases."""

    name = "grounding"
    Config = GroundingConfig
    needs = ("image", "grounding")
    adds = ("grounding", "num_boxes")

    def load(self) -> None:
        transformers = require("transformers", self.name)
        c = self.config
        config = hf_load(transformers.AutoConfig, c.detector, c.revision, self.name)
        family = DETECTORS.get(config.model_type)
        if family is None:
            raise UsageError(
                f"grounding: {c.detector!r} is a {config.model_type} model; detectors: OWLv2, Grounding DINO ({', '.join(DETECTORS)})"
            )
        processor = hf_load(transformers.AutoProcessor, c.detector, c.revision, self.name)
        model = hf_load(transformers.AutoModelForZeroShotObjectDetection, c.detector, c.revision, self.name)
        self.detector = family(model, processor, self.device, self.dtype)
        self.threshold = c.threshold if c.threshold is not None else family.threshold

    def provenance(self) -> dict[str, Any]:
        c = self.config
        return {
            "detector": c.detector,
            "revision": c.revision,
            "threshold": getattr(self, "threshold", c.threshold),
            "nms_iou": c.nms_iou,
            "device": self.device,
        }

    def prepare(self, row: dict[str, Any]) -> Any:
        entries = (row["grounding"] or [])[: self.config.max_phrases]
        if not entries:
            return {"entries": []}
        image = row_image(row, self.detector.draft)
        if isinstance(image, Skip):
            return image
        return {"entries": entries, **self.detector.prepare(image, [e["phrase"] for e in entries])}

    def infer(self, items: list[Any]) -> list[list[dict]]:
        todo = [i for i, it in enumerate(items) if it["entries"]]
        found = dict(zip(todo, self.detector.detect([items[i] for i in todo]), strict=True)) if todo else {}
        return [self._grounded(it["entries"], *found[i]) if i in found else [] for i, it in enumerate(items)]

    def _grounded(self, entries: list[dict], labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> list[dict]:
        by_phrase: dict[int, list[tuple[tuple[float, ...], float]]] = {}
        for label, box, score in select_boxes(labels, boxes, scores, self.threshold, self.config.nms_iou):
            by_phrase.setdefault(label, []).append((box, score))
        return [
            {**e, "boxes": [list(b) for b, _ in by_phrase[i]], "scores": [s for _, s in by_phrase[i]]}
            for i, e in enumerate(entries)
            if i in by_phrase
        ]

    def finish(self, batch: pa.Table, outputs: list[Any], reasons: list[str | None]) -> pa.Table:
        grounded = [o if o is not None else [] for o in outputs]
        counts = np.array([sum(len(e["boxes"]) for e in g) for g in grounded], dtype=np.int32)
        batch = set_column(batch, "grounding", pa.array(grounded, BY_NAME["grounding"].type))
        batch = set_column(batch, "num_boxes", pa.array(counts, pa.int32()))
        if self.config.mode == "score":
            return batch
        batch = reject(batch, pa.array(reasons, pa.string()).is_valid(), pa.array(reasons, pa.string()))
        return reject(batch, counts < self.config.min_boxes, "no_grounding")
