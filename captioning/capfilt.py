"""CapFilt: BLIP's bootstrapping of captions. A captioner writes ``num_captions`` synthetic captions
per image; a filter scores the web caption and every synthetic one against the image; captions
scoring at least ``threshold`` are kept and ``caption`` becomes the one ``caption_choice`` picks.

- ``captioner``: BLIP (``BlipForConditionalGeneration``) or any transformers image-to-text model
  (GIT, BLIP-2, Florence-2) by Hugging Face id (``captioner_revision`` pins it) or local folder.
  BLIP's recipe is the default: prompt ``"a picture of "`` (stripped from the output), nucleus
  sampling with ``top_p`` 0.9 and ``repetition_penalty`` 1.1; ``sampling: beam`` uses beam search.
  ``min_length``/``max_length`` count new tokens after the prompt, so no synthetic caption is empty.
- Sampling is seeded per row: the token at each step is the argmax of the top-p filtered
  log-probabilities plus Gumbel noise drawn from a generator seeded by sha256(``seed``, key,
  sample index) and the step. That is an exact draw from the nucleus distribution, and a row's
  captions do not depend on the batch it lands in (same device and precision).
- ``filter_model``: BLIP ITM (``BlipForImageTextRetrieval``, score = softmax(itm)[:, 1], default
  threshold 0.5, BLIP's rule), or CLIP cosine similarity through open_clip when it starts with
  ``local-dir:``, ``hf-hub:`` or ``open_clip:NAME:TAG`` (default threshold 0.28). Synthetic
  captions are never deduplicated. An image is decoded once for both models. A model of another
  kind (an ITM folder as ``captioner``, a captioner as ``filter_model``, an OWLv2) or without
  weights (``open_clip:NAME`` without a tag; ``TAG`` ``random`` asks for random ones) is a usage error.
- ``captions`` holds one entry per candidate (``text``, ``source`` web|synthetic, ``score``) on
  every row that reaches the stage, kept or rejected. ``caption_choice``: ``best`` (highest score),
  ``web_first`` or ``synthetic_first`` among the kept ones. A row where nothing passes is rejected
  ``no_matching_caption``, or under ``mode: score`` keeps its web caption. Rows without an image
  (``image_missing``) or with an undecodable one (``decode_error``) keep a web-only ``captions``.
- The models, their revisions, the prompt, sampling parameters and the seed rule go into
  ``run.json`` (``models``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.options import bounded, path_option
from mmcurate.schemas import BY_NAME
from mmcurate.stages.base import reject, set_column
from mmcurate.stages.model import ModelConfig, ModelStage, Skip, hf_load, open_clip_load, require, row_image

CLIP_PREFIXES = ("local-dir:", "hf-hub:", "open_clip:")
SEED_RULE = (
    "token = argmax(top_p(log_softmax(logits)) + Gumbel(u)), u ~ U(0,1) from a torch.Generator seeded by "
    "sha256(seed, key, sample)[:8] + step * 0x9E3779B97F4A7C15"
)


@dataclass
class CapfiltConfig(ModelConfig):
    captioner: str = path_option("Salesforce/blip-image-captioning-large")  # Hugging Face id or local folder
    captioner_revision: str | None = None  # pin the captioner (a commit, tag or branch)
    filter_model: str = path_option("Salesforce/blip-itm-large-coco")  # BLIP ITM; CLIP: local-dir:, hf-hub:, open_clip:NAME:TAG
    filter_revision: str | None = None
    threshold: float | None = None  # keep captions scoring at least this (ITM: 0 to 1, CLIP: -1 to 1); None: 0.5 for ITM, 0.28 for CLIP
    num_captions: int = bounded(3, ge=0)  # synthetic captions per image
    prompt: str = "a picture of "
    sampling: Literal["nucleus", "beam"] = "nucleus"
    top_p: float = bounded(0.9, gt=0, le=1)
    repetition_penalty: float = bounded(1.1, gt=0)  # 1: none
    num_beams: int = bounded(3, ge=1)  # sampling: beam
    min_length: int = bounded(5, ge=1)  # new tokens after the prompt
    max_length: int = bounded(30, ge=1)  # at most the captioner's positions less the prompt's (checked at load)
    seed: int = 0
    caption_choice: Literal["best", "web_first", "synthetic_first"] = "best"
    mode: Literal["filter", "score"] = "filter"
    batch_size: int = 16  # images per model call

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must not be above max_length ({self.max_length})")
        low, score = (-1.0, "a CLIP cosine") if self.clip_filter else (0.0, "a BLIP ITM probability")
        if self.threshold is not None and not low <= self.threshold <= 1.0:
            raise ValueError(f"threshold is {score}: it must be between {low:g} and 1, not {self.threshold:g}")
        if self.sampling == "beam" and self.num_beams < self.num_captions:
            raise ValueError(f"beam search returns at most num_beams ({self.num_beams}) captions, not num_captions {self.num_captions}")

    @property
    def clip_filter(self) -> bool:
        return self.filter_model.startswith(CLIP_PREFIXES)

    @property
    def min_score(self) -> float:
        return self.threshold if self.threshold is not None else (0.28 if self.clip_filter else 0.5)


class Capfilt(ModelStage):
    """Synthetic captions from a captioner, filtered with the web caption by BLIP ITM or CLIP."""

    name = "capfilt"
    Config = CapfiltConfig
    needs = ("image", "caption")
    adds = ("captions", "caption")

    def load(self) -> None:
        transformers = require("transformers", self.name)
        self._torch = require("torch", self.name)
        c = self.config
        self._captioner, self._processor = self._hf_model(
            transformers.AutoModelForImageTextToText, c.captioner, c.captioner_revision, "captioner", "a captioning (image-to-text) model"
        )
        if c.clip_filter:
            name, _, tag = (
                c.filter_model.removeprefix("open_clip:").partition(":")
                if c.filter_model.startswith("open_clip:")
                else (c.filter_model, "", "")
            )
            self._clip, self._clip_preprocess, self._clip_tokenizer = open_clip_load(name, tag or None, self.device, self.name)
        else:
            itm = transformers.BlipForImageTextRetrieval
            kind = "a BLIP image-text matching model"
            self._itm, self._itm_processor = self._hf_model(itm, c.filter_model, c.filter_revision, "filter_model", kind)
            same = self._itm_processor.image_processor.to_dict() == self._processor.image_processor.to_dict()
            self._shared_pixels = same
        self._prompt_ids = self._prompt()
        size = self._processor.image_processor.size
        self._draft = (size.get("width", size.get("shortest_edge", 384)), size.get("height", size.get("shortest_edge", 384)))

    def _hf_model(self, cls: Any, name: str, revision: str | None, option: str, kind: str) -> tuple[Any, Any]:
        """The transformers model (of ``cls``, on this stage's device, in eval mode) and processor of option ``option``."""
        transformers = require("transformers", self.name)
        model = hf_load(cls, name, revision, self.name, option=option, kind=kind, dtype=self.dtype)
        processor = hf_load(transformers.AutoProcessor, name, revision, self.name, option=option)
        return model.to(self.device).eval(), processor

    def _prompt(self) -> Any:
        """The prompt's token ids, which generation continues: without the ``[SEP]`` a BERT tokenizer
        ends a text with (BLIP, GIT) where the prompt feeds the decoder; a :class:`UsageError` when
        ``max_length`` new tokens after it would run past the captioner's positions."""
        c = self.config
        ids = self._processor(text=[c.prompt.strip()], return_tensors="pt")["input_ids"]
        config = self._captioner.config
        if not config.is_encoder_decoder and ids.shape[1] and ids[0, -1].item() == getattr(self._processor.tokenizer, "sep_token_id", None):
            ids = ids[:, :-1]
        positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        taken = 0 if config.is_encoder_decoder else ids.shape[1]
        if positions and c.max_length > positions - taken:
            raise UsageError(
                f"{self.name}: option 'max_length' must be at most {positions - taken} for captioner {c.captioner!r} "
                f"({positions} positions, {taken} taken by the prompt), not {c.max_length}"
            )
        return ids

    def provenance(self) -> dict[str, Any]:
        c = self.config
        return {
            "captioner": c.captioner,
            "captioner_revision": c.captioner_revision,
            "filter_model": c.filter_model,
            "filter_revision": c.filter_revision,
            "filter": "clip_cosine" if c.clip_filter else "blip_itm softmax(itm)[:, 1]",
            "threshold": c.min_score,
            "prompt": c.prompt,
            "sampling": {
                "method": c.sampling,
                "top_p": c.top_p,
                "repetition_penalty": c.repetition_penalty,
                "num_beams": c.num_beams,
                "num_captions": c.num_captions,
                "min_new_tokens": c.min_length,
                "max_new_tokens": c.max_length,
            },
            "seed": c.seed,
            "seed_rule": SEED_RULE,
            "device": self.device,
            "dtype": str(getattr(self, "dtype", "")),
        }

    # -- per row, in the decode threads ----------------------------------------------------------

    def prepare(self, row: dict[str, Any]) -> Any:
        image = row_image(row, self._draft)
        if isinstance(image, Skip):
            return image
        pixels = self._processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        if self.config.clip_filter:
            scored = self._clip_preprocess(image)
        else:
            scored = (
                pixels if self._shared_pixels else self._itm_processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            )
        web = (row["caption"] or "").strip()
        return {"key": row["key"], "pixels": pixels, "scored": scored, "web": web}

    # -- per batch, on the model's device --------------------------------------------------------

    def infer(self, items: list[Any]) -> list[list[dict[str, Any]]]:
        synthetic = self._generate(items) if self.config.num_captions else [[] for _ in items]
        candidates = [
            ([{"text": it["web"], "source": "web"}] if it["web"] else []) + [{"text": t, "source": "synthetic"} for t in texts]
            for it, texts in zip(items, synthetic, strict=True)
        ]
        rows = [i for i, cands in enumerate(candidates) for _ in cands]
        texts = [cand["text"] for cands in candidates for cand in cands]
        scores = self._scores(items, rows, texts) if texts else []
        flat = iter(scores)
        for cands in candidates:
            for cand in cands:
                cand["score"] = float(next(flat))
        return candidates

    def _generate(self, items: list[Any]) -> list[list[str]]:
        torch = self._torch
        c = self.config
        n = c.num_captions
        pixels = torch.stack([it["pixels"] for it in items]).to(self.device, self.dtype)
        prompt = self._prompt_ids.to(self.device)
        options: dict[str, Any] = {
            "max_new_tokens": c.max_length,
            "min_new_tokens": c.min_length,
            "repetition_penalty": c.repetition_penalty,
        }
        if c.sampling == "beam":
            options |= {"num_beams": c.num_beams, "num_return_sequences": n, "do_sample": False}
            repeat = 1
        else:
            seeds = [_row_seed(c.seed, it["key"], j) for it in items for j in range(n)]
            options |= {"do_sample": False, "num_beams": 1, "logits_processor": [SeededNucleus(seeds, c.top_p)]}
            repeat = n
        model = self._captioner
        if hasattr(model, "vision_model") and hasattr(model, "text_decoder"):  # BLIP: encode each image once
            embeds = model.vision_model(pixel_values=pixels)[0].repeat_interleave(repeat, dim=0)
            ids = prompt.repeat(embeds.shape[0], 1).clone()
            ids[:, 0] = model.config.text_config.bos_token_id
            text = model.config.text_config
            out = model.text_decoder.generate(
                input_ids=ids,
                eos_token_id=text.sep_token_id,
                pad_token_id=text.pad_token_id,
                encoder_hidden_states=embeds,
                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device),
                **options,
            )
        else:
            ids = prompt.repeat(pixels.shape[0] * repeat, 1)
            out = model.generate(pixel_values=pixels.repeat_interleave(repeat, dim=0), input_ids=ids, **options)
        decoded = [self._strip(t) for t in self._processor.batch_decode(out, skip_special_tokens=True)]
        return [decoded[i * n : (i + 1) * n] for i in range(len(items))]

    def _strip(self, text: str) -> str:
        text = " ".join(text.split())
        prompt = " ".join(self.config.prompt.split())
        return text[len(prompt) :].strip() if prompt and text.lower().startswith(prompt.lower()) else text

    def _scores(self, items: list[Any], rows: list[int], texts: list[str]) -> list[float]:
        torch = self._torch
        index = torch.tensor(rows, device=self.device)
        if self.config.clip_filter:
            images = torch.stack([it["scored"] for it in items]).to(self.device)
            image = torch.nn.functional.normalize(self._clip.encode_image(images).float(), dim=-1)[index]
            text = torch.nn.functional.normalize(self._clip.encode_text(self._clip_tokenizer(texts).to(self.device)).float(), dim=-1)
            return (image * text).sum(dim=-1).cpu().tolist()
        itm = self._itm
        pixels = torch.stack([it["scored"] for it in items]).to(self.device, self.dtype)
        embeds = itm.vision_model(pixel_values=pixels)[0][index]  # each image encoded once, then one row per candidate
        tokens = self._itm_processor.tokenizer(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt").to(
            self.device
        )
        hidden = itm.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device),
        ).last_hidden_state
        return itm.itm_head(hidden[:, 0, :]).float().softmax(dim=-1)[:, 1].cpu().tolist()

    # -- back to the table -----------------------------------------------------------------------

    def finish(self, batch: pa.Table, outputs: list[Any], reasons: list[str | None]) -> pa.Table:
        c = self.config
        webs = batch.column("caption").to_pylist()
        captions, chosen, unmatched = [], [], []
        for web, candidates in zip(webs, outputs, strict=True):
            if candidates is None:  # no image to caption: the web caption alone, unscored
                captions.append([{"text": web.strip(), "source": "web", "score": None}] if web and web.strip() else [])
                chosen.append(web)
                unmatched.append(False)
                continue
            captions.append(candidates)
            pick = _choose(candidates, c.min_score, c.caption_choice)
            chosen.append(pick if pick is not None else web)
            unmatched.append(pick is None)
        batch = set_column(batch, "captions", pa.array(captions, BY_NAME["captions"].type))
        batch = set_column(batch, "caption", pa.array(chosen, pa.string()))
        if c.mode == "score":
            return batch
        batch = reject(batch, [r is not None for r in reasons], pa.array(reasons, pa.string()))
        return reject(batch, unmatched, "no_matching_caption")


def _choose(candidates: list[dict[str, Any]], threshold: float, choice: str) -> str | None:
    """The training caption among the candidates scoring at least ``threshold``; None when none does."""
    kept = [cand for cand in candidates if passes(cand["score"], threshold)]
    if not kept:
        return None
    best = max(kept, key=lambda cand: cand["score"])  # first of equals: the web caption before synthetic ones
    if choice == "best":
        return best["text"]
    first = "web" if choice == "web_first" else "synthetic"
    preferred = [cand for cand in kept if cand["source"] == first]
    return max(preferred, key=lambda cand: cand["score"])["text"] if preferred else best["text"]


def passes(score: float | None, threshold: float) -> bool:
    """Whether a candidate's score passes the filter: the stored float32 at least ``threshold`` (as a re-check would see it)."""
    return score is not None and bool(np.float32(score) >= threshold)


def _row_seed(seed: int, key: str, sample: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}\0{sample}".encode()).digest()[:8], "little") >> 1


class SeededNucleus:
    """A logits processor for greedy decoding that makes it nucleus sampling seeded per row: top-p
    filter, then Gumbel noise from a generator seeded by the row's seed and the step."""

    def __init__(self, seeds: list[int], top_p: float) -> None:
        from transformers import TopPLogitsWarper

        self.seeds = seeds
        self.top_p = TopPLogitsWarper(top_p)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1]
        scores = self.top_p(input_ids, scores.float().log_softmax(dim=-1))
        noise = torch.empty_like(scores)
        for row, seed in enumerate(self.seeds):
            generator = torch.Generator(device=scores.device).manual_seed((seed + step * 0x9E3779B97F4A7C15) % 2**63)
            noise[row] = torch.rand(scores.shape[1], generator=generator, device=scores.device)
        return scores - torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
