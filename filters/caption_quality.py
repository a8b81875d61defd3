"""Caption quality: normalisation, word/character counts and junk patterns.

Normalisation (``normalize: true``, the default) rewrites ``caption``: ftfy repairs mojibake and
decodes HTML entities, HTML tags are removed and whitespace is collapsed. Counts and checks then
run on the normalised text, so later stages (language, CLIP) see the clean caption too.

Reasons, in the order they are checked: ``caption_missing``, ``caption_url`` (a bare URL),
``caption_filename`` (``IMG_1234.jpg``, ``DSC01234``, ``red-summer-dress-2019``),
``caption_placeholder`` (``image``, ``untitled``, ``lorem ipsum``...), ``caption_html`` (markup
left after normalisation), ``caption_repeated_chars`` (one non-digit character ``max_repeat``
times or more in a row), ``caption_too_short``, ``caption_too_long``. ``junk`` picks the
pattern checks to apply (``[]``: counts and length bounds only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ftfy
import pyarrow as pa

from mmcurate.filters.common import Mode, check_mode
from mmcurate.options import bounded
from mmcurate.stages.base import Resources, Stage, reject, set_column

JUNK_CHECKS = ("url", "filename", "placeholder", "html", "repeated_chars")

_IMAGE_EXT = r"\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg|avif)"
_FILENAME = re.compile(
    rf"(?:.*{_IMAGE_EXT}"  # anything ending in an image file extension
    r"|(?:img|dsc[nf_]?|dcim|pict?|pxl|mvimg|gopr|dji|sam|wp|vid|screenshot)[ _-]?\d[\d _-]*"  # camera names
    r"|(?=[0-9a-f_-]*\d)[0-9a-f_-]{8,}"  # bare ids and hashes
    r"|\w+(?:[-_]\w+){2,})",  # URL slugs: three or more words joined by - or _
    re.IGNORECASE,
)
_URL = re.compile(
    r"(?:https?://|www\.)\S+|[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|edu|gov|io|co|info|biz|de|uk|ru|fr|jp|cn)(?:/\S*)?", re.IGNORECASE
)
_PLACEHOLDER_WORDS = (
    "image|images|img|photo|photos|picture|pic|thumbnail|thumb|untitled|untitled image|no title|no image|no photo|"
    "no description|no description available|image not found|image not available|alt|alt text|placeholder|default|"
    "null|none|n/?a|nan|undefined|unknown|blank|spacer|pixel|loading|logo|icon|banner|click here|click to enlarge|"
    "description|image description|caption|title|test|featured image|product image|main image"
)
_PLACEHOLDER = re.compile(rf"(?:{_PLACEHOLDER_WORDS})(?: ?(?:#|no\.?)? ?\d+)?|lorem ipsum.*", re.IGNORECASE)
_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?\s*>")
_HTML = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:[\s/>]|$)|&(?:#\d+|#x[0-9a-fA-F]+|[a-zA-Z]{2,8});")
_SPACE = re.compile(r"\s+")


@dataclass
class CaptionQualityConfig:
    min_words: int = bounded(2, ge=0)  # DataComp basic: more than 2 words -> 3
    min_chars: int = bounded(5, ge=0)  # LAION: at least 5 characters; DataComp basic: more than 5 -> 6
    max_words: int | None = bounded(None, ge=0)
    max_chars: int | None = bounded(None, ge=0)
    junk: tuple[str, ...] = JUNK_CHECKS  # which junk patterns to reject; [] for counts only
    max_repeat: int = bounded(5, ge=2)  # a non-digit, non-space character this many times in a row is junk
    normalize: bool = True  # rewrite caption: ftfy, HTML tags removed, whitespace collapsed
    mode: Mode = "filter"

    def __post_init__(self) -> None:
        check_mode(self.mode)
        unknown = [j for j in self.junk if j not in JUNK_CHECKS]
        if unknown:
            raise ValueError(f"unknown junk check {unknown[0]!r} (checks: {', '.join(JUNK_CHECKS)})")
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) is below min_words ({self.min_words})")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")


def normalize_caption(text: str) -> str:
    """ftfy-repaired text without HTML tags or entities, whitespace collapsed."""
    text = ftfy.fix_text(text, unescape_html=True)
    return _SPACE.sub(" ", _TAG.sub(" ", text)).strip()


class CaptionQuality(Stage):
    """Count words and characters of each caption and reject empty, too short or junk captions."""

    name = "caption_quality"
    Config = CaptionQualityConfig
    resources = Resources(cpus=1)
    needs = ("caption",)
    adds = ("caption", "caption_words", "caption_chars")

    def __init__(self, config: CaptionQualityConfig | None = None) -> None:
        super().__init__(config)
        if not self.config.normalize:
            self.adds = ("caption_words", "caption_chars")
        checks = {
            "filename": lambda t: _FILENAME.fullmatch(t) is not None,
            "url": lambda t: _URL.fullmatch(t) is not None,
            "placeholder": lambda t: _PLACEHOLDER.fullmatch(t.strip(" .:-_!?'\"")) is not None,
            "html": lambda t: _HTML.search(t) is not None,
            "repeated_chars": re.compile(rf"([^\s\d])\1{{{self.config.max_repeat - 1},}}").search,
        }
        self._checks = [(f"caption_{name}", checks[name]) for name in JUNK_CHECKS if name in self.config.junk]

    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        captions = batch.column("caption").to_pylist()
        if c.normalize:
            captions = [None if t is None else normalize_caption(t) for t in captions]
            batch = set_column(batch, "caption", captions, pa.string())
        words = [len(t.split()) if t else 0 for t in captions]
        chars = [len(t) if t else 0 for t in captions]
        batch = set_column(batch, "caption_words", words, pa.int32())
        batch = set_column(batch, "caption_chars", chars, pa.int32())
        if c.mode == "score":
            return batch
        reasons = pa.array([self._reason(t, w, n) for t, w, n in zip(captions, words, chars, strict=True)], pa.string())
        return reject(batch, reasons.is_valid(), reasons)

    def _reason(self, text: str | None, words: int, chars: int) -> str | None:
        c = self.config
        if not text or not text.strip():
            return "caption_missing"
        for reason, check in self._checks:
            if check(text):
                return reason
        if words < c.min_words or chars < c.min_chars:
            return "caption_too_short"
        if (c.max_words is not None and words > c.max_words) or (c.max_chars is not None and chars > c.max_chars):
            return "caption_too_long"
        return None
