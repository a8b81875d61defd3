"""capfilt with a tiny random BLIP captioner + ITM on real photos: the CLI's output, seeded captions
that do not depend on the batch, the caption choice, provenance, missing models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mmcurate.captioning.capfilt import Capfilt, _choose
from mmcurate.cli import main
from mmcurate.errors import UsageError
from mmcurate.schemas import BY_NAME
from mmcurate.tests.support.capfilt import photo_table, read_rows
from mmcurate.tooling.validate import validate

pytest.importorskip("transformers")


def test_cli_gives_every_row_web_and_synthetic_captions(tmp_path: Path, img2dataset_output: Path, tiny_blip: dict) -> None:
    settings = [f"captioner={tiny_blip['captioner']}", f"filter_model={tiny_blip['itm']}", "num_captions=3"]
    outputs = []
    for run in ("one", "two"):
        args = ["stage", "capfilt", "--input", str(img2dataset_output), "--output", str(tmp_path / run), "--workers", "1", "--no-progress"]
        assert main(args + [a for s in settings for a in ("--set", s)]) == 0
        outputs.append(read_rows(tmp_path / run))
    rows = outputs[0]
    assert validate(str(tmp_path / "one")) == []
    reached = [r for r in rows.values() if r["reject_stage"] != "read"]
    assert len(reached) == 10 and len(rows) == 12  # 2 shards x 6 rows, one failed download each
    for row in reached:
        web = [c for c in row["captions"] if c["source"] == "web"]
        synthetic = [c for c in row["captions"] if c["source"] == "synthetic"]
        assert len(synthetic) == 3 and all(c["text"] for c in synthetic) and len(web) <= 1
        if row["reject_reason"] == "no_matching_caption":  # the caption stays the web one
            assert [c["text"] for c in web] == ([row["caption"]] if row["caption"] else [])
        assert all(0.0 <= c["score"] <= 1.0 for c in row["captions"])
        assert row["reject_reason"] in (None, "no_matching_caption")
    assert all(r["captions"] is None for r in rows.values() if r["reject_stage"] == "read")
    assert outputs[0] == outputs[1]  # two runs: the same captions, scores and decisions
    run_json = json.loads((tmp_path / "one" / "run.json").read_text())
    [model] = run_json["models"]
    assert model["captioner"] == tiny_blip["captioner"] and model["sampling"]["top_p"] == 0.9 and "sha256" in model["seed_rule"]


def test_captions_do_not_depend_on_the_batch(tiny_blip: dict, jpeg_photos: list[dict], photo_dir: Path) -> None:
    table = photo_table(jpeg_photos, photo_dir, 9)
    results = []
    for batch_size, workers in ((1, 1), (7, 3)):
        stage = Capfilt.from_params(
            {
                "captioner": tiny_blip["captioner"],
                "filter_model": tiny_blip["itm"],
                "batch_size": batch_size,
                "workers": workers,
                "mode": "score",
            }
        )
        stage.setup()
        results.append(stage.process(table).column("captions").to_pylist())
    texts = [[c["text"] for c in row] for row in results[0]]
    assert texts == [[c["text"] for c in row] for row in results[1]]
    assert np.allclose([c["score"] for row in results[0] for c in row], [c["score"] for row in results[1] for c in row], atol=1e-5)
    synthetic = [
        t for row, captions in zip(texts, results[0], strict=True) for t, c in zip(row, captions, strict=True) if c["source"] == "synthetic"
    ]
    assert len(set(synthetic)) == len(synthetic)  # per-row, per-sample seeds: no two samples alike


def test_caption_choice_and_score_mode(tiny_blip: dict, jpeg_photos: list[dict], photo_dir: Path) -> None:
    web, a, b = (
        {"text": "web", "source": "web", "score": 0.6},
        {"text": "a", "source": "synthetic", "score": 0.9},
        {"text": "b", "source": "synthetic", "score": 0.4},
    )
    assert _choose([web, a, b], 0.5, "best") == "a"
    assert _choose([web, a, b], 0.5, "web_first") == "web"
    assert _choose([web, b], 0.5, "synthetic_first") == "web"  # no synthetic caption passes: the web one does
    assert _choose([web, a, b], 0.95, "best") is None
    table = photo_table(jpeg_photos, photo_dir, 4)
    params = {"captioner": tiny_blip["captioner"], "filter_model": tiny_blip["itm"], "num_captions": 2}
    scored = Capfilt.from_params({**params, "mode": "score", "threshold": 1.0})
    scored.setup()
    out = scored.process(table)
    assert out.column("reject_reason").null_count == 4 and out.column("caption").to_pylist() == table.column("caption").to_pylist()
    lowest = min(c["score"] for row in out.column("captions").to_pylist() for c in row)
    keep_all = Capfilt.from_params({**params, "threshold": lowest, "caption_choice": "synthetic_first"})
    keep_all.setup()
    chosen = keep_all.process(table)
    assert chosen.column("reject_reason").null_count == 4
    for row, caption in zip(chosen.column("captions").to_pylist(), chosen.column("caption").to_pylist(), strict=True):
        best = max((c for c in row if c["source"] == "synthetic"), key=lambda c: c["score"])
        assert caption == best["text"]


def test_bad_images_keep_their_web_caption(tiny_blip: dict, jpeg_photos: list[dict], photo_dir: Path) -> None:
    table = photo_table(jpeg_photos, photo_dir, 1)
    table = pa.concat_tables(
        [
            table,
            pa.table(
                {"key": ["x", "y"], "image": [b"not an image", None], "caption": ["a cat", None], "reject_reason": pa.nulls(2, pa.string())}
            ),
        ]
    )
    stage = Capfilt.from_params({"captioner": tiny_blip["captioner"], "filter_model": tiny_blip["itm"], "threshold": 0.0})
    stage.setup()
    out = stage.process(table)
    assert out.column("reject_reason").to_pylist() == [None, "decode_error", "image_missing"]
    assert out.column("captions").to_pylist()[1:] == [[{"text": "a cat", "source": "web", "score": None}], []]


def test_missing_models_are_one_line(tmp_path: Path) -> None:
    for params, message in (
        ({"captioner": "Salesforce/blip-image-captioning-large"}, "HF_HUB_OFFLINE is set"),
        ({"captioner": str(tmp_path / "nothing")}, "does not exist"),
    ):
        with pytest.raises(UsageError, match=message) as error:
            Capfilt.from_params(params).setup()
        assert "\n" not in str(error.value)
    with pytest.raises(UsageError):
        Capfilt.from_params({"sampling": "beam", "num_beams": 2, "num_captions": 3})


def test_a_model_of_another_kind_is_one_line(tmp_path: Path, tiny_blip: dict, img2dataset_output: Path, capsys) -> None:
    """Swapped BLIP models (each lacks the other's weights), another architecture, an open_clip name
    without a tag: a usage error naming the option, never a run on random weights."""
    from transformers import Owlv2Config

    from mmcurate.tests.support.filters import write_tiny_clip

    owl = tmp_path / "owlv2"
    Owlv2Config().save_pretrained(owl)  # a config alone: it is refused before any weights are read
    write_tiny_clip(tmp_path)  # registers the open_clip name mmcurate-tiny-clip
    models = {"captioner": tiny_blip["captioner"], "filter_model": tiny_blip["itm"]}
    for params, message in (
        ({"captioner": tiny_blip["itm"]}, f"captioner '{tiny_blip['itm']}' has no weights for text_decoder .*: is it a captioning"),
        (
            {"filter_model": tiny_blip["captioner"]},
            "filter_model .* has no weights for itm_head, text_encoder, text_proj, vision_proj .*: is it a BLIP image-text matching",
        ),
        ({"captioner": str(owl)}, f"captioner '{owl}' is a model of type owlv2, not a captioning"),
        ({"filter_model": str(owl)}, f"filter_model '{owl}' is a model of type owlv2, not a BLIP image-text matching model"),
        ({"filter_model": "open_clip:mmcurate-tiny-clip"}, "no pretrained tag, so its weights would be random: give one of random"),
        ({"captioner": "models/nothing/here"}, "'models/nothing/here' is neither a folder nor a Hugging Face model id"),
    ):
        with pytest.raises(UsageError, match=message) as error:
            Capfilt.from_params({**models, **params, "device": "cpu"}).setup()
        assert "\n" not in str(error.value)
    settings = ["--set", f"captioner={tiny_blip['itm']}", "--set", f"filter_model={tiny_blip['itm']}", "--no-progress"]
    capsys.readouterr()
    assert main(["stage", "capfilt", "--input", str(img2dataset_output), "--output", str(tmp_path / "out"), *settings]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no weights for text_decoder" in err  # the one line, no transformers load report


def test_an_open_clip_filter_with_random_weights_is_asked_for(tmp_path: Path, tiny_blip: dict) -> None:
    from mmcurate.tests.support.filters import write_tiny_clip

    write_tiny_clip(tmp_path)
    stage = Capfilt.from_params({"captioner": tiny_blip["captioner"], "filter_model": "open_clip:mmcurate-tiny-clip:random"})
    stage.setup()
    assert stage._clip.visual.image_size == (64, 64)


def test_model_folders_beside_the_yaml(tmp_path: Path, tiny_blip: dict, img2dataset_output: Path, monkeypatch) -> None:
    """A pipeline naming its models relative to its YAML runs from any folder; run.json records where they are."""
    models = Path(tiny_blip["captioner"]).parent
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"input: {{path: {img2dataset_output}}}\noutput: {{path: out}}\nworkers: 1\n"
        f"stages:\n  - capfilt: {{captioner: {models.name}/captioner, filter_model: {models.name}/itm, num_captions: 1}}\n"
    )
    (tmp_path / models.name).symlink_to(models)
    monkeypatch.chdir(models.parent.parent)  # where f"{models.name}/captioner" is no folder
    assert main(["run", str(pipeline), "--no-progress"]) == 0
    [model] = json.loads((tmp_path / "out" / "run.json").read_text())["models"]
    assert (model["captioner"], model["filter_model"]) == (tiny_blip["captioner"], tiny_blip["itm"])  # resolved, the link too


def test_option_bounds(tiny_blip: dict) -> None:
    """Options a run would fail on (or reject every row with) are one line before any row."""
    models = {"captioner": tiny_blip["captioner"], "filter_model": tiny_blip["itm"]}
    for params, message in (
        ({"repetition_penalty": -1}, "option 'repetition_penalty' must be positive"),
        ({"top_p": 0}, "option 'top_p' must be more than 0 and at most 1"),
        ({"num_beams": 0}, "option 'num_beams' must be at least 1"),
        ({"min_length": 0}, "option 'min_length' must be at least 1"),
        ({"min_length": 9, "max_length": 8}, r"min_length \(9\) must not be above max_length \(8\)"),
        ({"threshold": 28}, "threshold is a BLIP ITM probability: it must be between 0 and 1, not 28"),
        ({"threshold": -0.1}, "threshold is a BLIP ITM probability: it must be between 0 and 1"),
        ({"threshold": 1.5, "filter_model": "open_clip:ViT-B-32:openai"}, "threshold is a CLIP cosine: it must be between -1 and 1"),
    ):
        with pytest.raises(UsageError, match=message):
            Capfilt.from_params({**models, **params})
    assert Capfilt.from_params({**models, "threshold": -0.5, "filter_model": "open_clip:ViT-B-32:openai"}).config.min_score == -0.5


def test_max_length_is_bounded_by_the_captioners_positions(tiny_blip: dict, jpeg_photos: list[dict], photo_dir: Path) -> None:
    """The tiny BLIP decoder has 64 positions, 4 of them the prompt's ([DEC] a picture of): 60 new tokens
    fit (forced with min_length), 61 are refused at load, not an IndexError mid-run."""
    models = {"captioner": tiny_blip["captioner"], "filter_model": tiny_blip["itm"], "num_captions": 1, "mode": "score"}
    with pytest.raises(UsageError, match=r"at most 60 for captioner .* \(64 positions, 4 taken by the prompt\), not 61"):
        Capfilt.from_params({**models, "max_length": 61}).setup()
    stage = Capfilt.from_params({**models, "min_length": 60, "max_length": 60})
    stage.setup()
    [row] = stage.process(photo_table(jpeg_photos, photo_dir, 1)).column("captions").to_pylist()
    assert len(stage._processor.tokenizer.tokenize(row[-1]["text"])) >= 57  # 60 tokens, a few of them special ones dropped


def test_a_git_prompt_is_continued_not_ended(tmp_path: Path, tiny_blip: dict, jpeg_photos: list[dict], photo_dir: Path) -> None:
    """GIT gets [CLS] + the prompt's tokens, no [SEP] (as its docs pass it), and captions through the same seeded sampling."""
    from mmcurate.tests.support.capfilt import write_tiny_git

    git = write_tiny_git(tmp_path / "git", Path(tiny_blip["captioner"]).parent / "vocab.txt")
    stage = Capfilt.from_params({"captioner": git, "filter_model": tiny_blip["itm"], "num_captions": 2, "mode": "score"})
    stage.setup()
    assert stage._processor.tokenizer.convert_ids_to_tokens(stage._prompt_ids[0]) == ["[CLS]", "a", "picture", "of"]
    rows = stage.process(photo_table(jpeg_photos, photo_dir, 2)).column("captions").to_pylist()
    assert all(sum(c["source"] == "synthetic" and bool(c["text"]) for c in row) == 2 for row in rows)


def test_inspect_and_validate_cover_captions(tmp_path: Path, img2dataset_output: Path, tiny_blip: dict) -> None:
    from mmcurate.tooling.inspect import inspect_dataset
    from mmcurate.tooling.validate import check_table

    settings = [f"captioner={tiny_blip['captioner']}", f"filter_model={tiny_blip['itm']}", "num_captions=2", "mode=score"]
    args = ["stage", "capfilt", "--input", str(img2dataset_output), "--output", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    assert main(args + [a for s in settings for a in ("--set", s)]) == 0
    report = inspect_dataset(str(tmp_path / "out"))
    assert "captions: list<" in report and "20 synthetic" in report and "caption taken from: web" in report
    bad = pa.table({"key": ["k"], "captions": pa.array([[{"text": "x", "source": "alt", "score": 0.5}]], BY_NAME["captions"].type)})
    assert any("field captions" in p for p in check_table(bad, "f.parquet", kept=True))


def test_clip_filter(tmp_path: Path, tiny_blip: dict, jpeg_photos: list[dict], photo_dir: Path) -> None:
    """With an open_clip filter the scores are CLIP cosines: the same as the clip_score stage gives."""
    from mmcurate.filters.clip_score import ClipScore
    from mmcurate.tests.support.filters import write_tiny_clip

    clip = write_tiny_clip(tmp_path)
    table = photo_table(jpeg_photos, photo_dir, 4)
    stage = Capfilt.from_params({"captioner": tiny_blip["captioner"], "filter_model": clip, "num_captions": 1, "mode": "score"})
    stage.setup()
    assert stage.config.min_score == 0.28
    rows = stage.process(table).column("captions").to_pylist()
    texts = [row[-1]["text"] for row in rows]
    reference = ClipScore.from_params({"model": clip, "min_score": None})
    reference.setup()
    expected = reference.process(table.set_column(2, "caption", pa.array(texts))).column("clip_score").to_pylist()
    assert np.allclose([row[-1]["score"] for row in rows], expected, atol=2e-3)  # JPEG draft sizes differ slightly
