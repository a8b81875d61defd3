"""Stage registry: pipeline and CLI names to stage classes, imported on first use so the core needs no torch."""

from __future__ import annotations

import importlib

from mmcurate.errors import UsageError
from mmcurate.stages.base import Stage

STAGES: dict[str, str] = {
    "download": "mmcurate.download.stage:Download",
    "image_size": "mmcurate.filters.image_size:ImageSize",
    "aspect_ratio": "mmcurate.filters.image_size:AspectRatio",
    "caption_quality": "mmcurate.filters.caption_quality:CaptionQuality",
    "language": "mmcurate.filters.language:Language",
    "clip_score": "mmcurate.filters.clip_score:ClipScore",
    "nsfw": "mmcurate.filters.nsfw:Nsfw",
    "blocklist": "mmcurate.filters.blocklist:Blocklist",
    "select": "mmcurate.filters.select:Select",
    "exact_dedup": "mmcurate.dedup.exact:ExactDedup",
    "phash_dedup": "mmcurate.dedup.phash:PhashDedup",
    "minhash_dedup": "mmcurate.dedup.minhash:MinhashDedup",
    "noun_phrases": "mmcurate.captioning.noun_phrases:NounPhrases",
    "capfilt": "mmcurate.captioning.capfilt:Capfilt",
    "grounding": "mmcurate.captioning.grounding:Grounding",
}


def stage_class(name: str) -> type[Stage]:
    """The stage class registered as ``name``; UsageError for an unknown name."""
    if name not in STAGES:
        raise UsageError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    module, _, cls = STAGES[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] == "mmcurate":
            raise
        raise UsageError(f"stage {name!r} needs a package that is not installed ({e.name}); install mmcurate[models]") from None
