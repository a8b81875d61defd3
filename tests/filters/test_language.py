"""language: fastText lid.176 accuracy on 6,000 real sentences, keep-list, threshold, the CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmcurate.errors import UsageError
from mmcurate.filters.language import LID176, Language, bundled_model, normalize_code
from mmcurate.tests.support.filters import kept, rejects, run_cli, run_command


@pytest.fixture(scope="module")
def language() -> Language:
    stage = Language()
    stage.setup()
    return stage


def table(captions: list[str | None]) -> pa.Table:
    return pa.table(
        {
            "key": [f"k{i}" for i in range(len(captions))],
            "caption": pa.array(captions, pa.string()),
            "reject_reason": pa.nulls(len(captions), pa.string()),
        }
    )


def test_top1_accuracy_on_6000_sentences(data_dir: Path, language: Language) -> None:
    """30 languages x 200 real sentences (Leipzig corpora via lingua-py): top-1 accuracy >= 0.95."""
    # Split on newlines only: a few sentences hold other Unicode line separators.
    lines = [line for line in (data_dir / "langid" / "sentences.tsv").read_text(encoding="utf-8").split("\n")[1:] if line]
    gold, texts = zip(*(line.split("\t", 1) for line in lines), strict=True)
    assert len(texts) == 6000
    predicted, scores = language.predict(list(texts))
    correct = [normalize_code(g) == p for g, p in zip(gold, predicted, strict=True)]
    accuracy = sum(correct) / len(correct)
    per_language = Counter(g for g, ok in zip(gold, correct, strict=True) if ok)
    print(f"lid.176 top-1 accuracy {accuracy:.4f}; weakest: {sorted(per_language.items(), key=lambda x: x[1])[:3]}")
    assert accuracy >= 0.95
    assert all(0.0 < s <= 1.0 for s in scores)


def test_filter_keep_list_threshold_and_missing(language: Language) -> None:
    t = table(
        [
            "A dog is running on the beach with a ball.",
            "Un chien court sur la plage avec une balle.",
            None,
            "ok",
            "这是一只在海滩上奔跑的狗",
        ]
    )
    out = language.process(t)
    assert out.column("language").to_pylist() == ["en", "fr", None, "en", "zh"]
    assert out.column("reject_reason").to_pylist() == [None, "unwanted_language", "caption_missing", None, "unwanted_language"]
    strict = Language.from_params({"keep": ["en", "zh-CN"], "min_score": 0.9})
    strict.setup()
    reasons = strict.process(t).column("reject_reason").to_pylist()
    assert reasons[0] is None and reasons[4] is None and reasons[3] == "language_uncertain"


def test_score_mode_and_every_language(language: Language) -> None:
    t = table(["Guten Morgen, wie geht es dir heute?", None])
    scored = Language.from_params({"mode": "score"})
    scored.setup()
    out = scored.process(t)
    assert out.column("language").to_pylist() == ["de", None] and out.column("reject_reason").null_count == 2
    anyone = Language.from_params({"keep": [], "min_score": 0.0})
    anyone.setup()
    assert anyone.process(t).column("reject_reason").to_pylist() == [None, "caption_missing"]


def test_codes_and_model_path(tmp_path: Path) -> None:
    assert [normalize_code(c) for c in ("zh-CN", "pt_BR", "EN", "iw", "in")] == ["zh", "pt", "en", "he", "id"]
    stage = Language.from_params({"model_path": str(tmp_path / "missing.ftz")})
    with pytest.raises(UsageError, match="cannot load fastText model"):
        stage.setup()
    with pytest.raises(UsageError):
        Language.from_params({"min_score": 1.5})


def test_cli(tmp_path: Path, photo_dataset: Path, photos: pa.Table) -> None:
    out = tmp_path / "out"
    assert run_command("stage", "language", photo_dataset, out, "keep=en", "min_score=0.3") == 0
    table = kept(out)
    assert set(table.column("language").to_pylist()) == {"en"}
    assert all(s >= 0.3 for s in table.column("language_score").to_pylist())
    missing = sum(c is None for c in photos.column("caption").to_pylist())
    assert table.num_rows + len(rejects(out)) == photos.num_rows and list(rejects(out).values()).count("caption_missing") == missing


def test_two_language_stages_apply_their_own_settings(tmp_path: Path) -> None:
    """Two stages of one name are two stages: each is set up and keeps its own options, and the
    run names them apart (``language#1``, ``language#2``) in reject_stage, stats and ``--set``."""
    captions = [
        "A dog is running on the beach with a ball.",
        "Un chien court sur la plage avec une balle.",
        "Ein Hund rennt mit einem Ball am Strand entlang.",
        "El perro corre por la playa con una pelota.",
        "ok",
    ]
    pq.write_table(pa.table({"url": [f"http://x.invalid/{i}.jpg" for i in range(5)], "caption": captions}), tmp_path / "in.parquet")
    stages = [{"language": {"keep": ["en", "fr", "de"]}}, {"language": {"keep": ["en", "fr", "de"], "min_score": 0.9}}]
    pipeline = {"input": {"path": "in.parquet"}, "output": {"path": "out", "format": "parquet"}, "stages": stages}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(pipeline))
    assert run_cli("run", str(tmp_path / "two.yaml"), "--set", "language#2.keep=en,fr") == 0
    out = pq.read_table(tmp_path / "out" / "rejects" / "00000.parquet").sort_by("url")
    found = zip(*(out.column(c).to_pylist() for c in ("url", "reject_stage", "reject_reason")), strict=True)
    assert list(found) == [
        ("http://x.invalid/2.jpg", "language#2", "unwanted_language"),  # de: kept by the first, not by the second
        ("http://x.invalid/3.jpg", "language#1", "unwanted_language"),  # es: kept by neither
        ("http://x.invalid/4.jpg", "language#2", "language_uncertain"),  # en below the second's min_score
    ]
    stats = json.loads((tmp_path / "out" / "_stats" / "00000.json").read_text())["stages"]
    assert [(s["stage"], s["rows_in"], s["rejected"]) for s in stats] == [("read", 5, 0), ("language#1", 5, 1), ("language#2", 4, 2)]


@pytest.mark.parametrize(
    "given, hint",
    [("english", "did you mean 'en'?"), ("German", "did you mean 'de'?"), ("eng", "'en'"), ("xx", "ISO 639 codes")],
)
def test_keep_lists_lid176_codes(given: str, hint: str) -> None:
    """A ``keep`` entry lid.176 never predicts would reject every row: refused, with the code meant."""
    with pytest.raises(UsageError, match=f"keep lists '{given}', not a language lid.176 identifies; .*{re.escape(hint)}"):
        Language.from_params({"keep": ["en", given]})
    assert Language.from_params({"keep": ["zh-CN", "iw", "yue"]}).config.keep == ("zh", "he", "yue")
    assert Language.from_params({"keep": [given], "model_path": "another.bin"}).config.keep  # another model: its own labels


def test_lid176_codes_are_the_bundled_models_labels() -> None:
    import fasttext

    labels, _ = fasttext.load_model(bundled_model()).predict("a", k=-1, threshold=-1.0)
    assert {label.removeprefix("__label__") for label in labels} == LID176
