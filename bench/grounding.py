"""Grounding throughput: the grounding stage against a per-image Hugging Face loop, in the same run.

Models: full-size OWLv2-B/16 at 960 px (``Owlv2ForObjectDetection``, CLIP tokenizer from open_clip's
BPE vocabulary) and Grounding DINO tiny (Swin-T + BERT-base), random weights (they do not change
the cost), saved to a temporary folder that the stage loads. Data: the COCO photos of
``tests/data/images`` with the noun phrases of their first caption (``noun_phrases``, spaCy),
repeated to ``--images``.

The loop is the transformers documentation's recipe, one image at a time: decode, processor (all
the image's phrases as queries), forward, ``post_process_grounded_object_detection``; fp32. The stage
decodes and preprocesses ahead in threads, batches ``--batch-size`` images with padded phrase lists,
runs NMS across phrases, and uses bf16 on a GPU; it also runs at batch 1, so that the gain of batching
alone shows. Images/s are the best of ``--repeat`` alternating runs.

``--parts`` times instead where OWLv2's time goes, per image: preprocessing, the text queries, the
vision encoder at batch 1 and at ``--batch-size``, and the whole forward; on CPU the vision encoder
is nearly all of it, which bounds what batching, caching phrase embeddings or faster preprocessing
can gain there.

The GPU machine has no spaCy or open_clip: prepare there from here with ``--prepare DIR`` (phrases
and the CLIP tokenizer) and run with ``--prepared DIR`` on the GPU.

    python bench/grounding.py [--images 8] [--batch-size 8] [--device cpu] [--detectors owlv2,grounding-dino]
    python bench/grounding.py --parts [--batch-size 2]                # OWLv2's time by part
    python bench/grounding.py --prepare bench/out/grounding          # here, on CPU
    python bench/grounding.py --prepared bench/out/grounding --device cuda --images 128 --batch-size 16
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, CLIPTokenizer

from mmcurate.captioning.grounding import Grounding
from mmcurate.schemas import BY_NAME
from mmcurate.tests.support import DATA
from mmcurate.tests.support.coco import coco_captions
from mmcurate.tests.support.detectors import save_grounding_dino, save_owlv2


def phrases_of_photos() -> list[dict]:
    """Per COCO photo: file and the noun-phrase entries of its first caption."""
    from mmcurate.captioning.noun_phrases import NounPhraseExtractor, load_spacy

    captions = coco_captions(DATA / "images")
    files = sorted(captions)
    entries = NounPhraseExtractor(load_spacy("en_core_web_sm")).entries([captions[f][0] for f in files])
    return [{"file": f, "grounding": e} for f, e in zip(files, entries, strict=True) if e]


def prepare(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "phrases.json").write_text(json.dumps(phrases_of_photos()))
    from mmcurate.tests.support.detectors import clip_tokenizer

    clip_tokenizer(folder / "bpe").save_pretrained(folder / "clip_tokenizer")
    print(f"prepared {folder}")


def table(rows: list[dict], n: int) -> pa.Table:
    picked = [rows[i % len(rows)] for i in range(n)]
    return pa.table(
        {
            "key": [f"{i:05d}" for i in range(n)],
            "image": [(DATA / "images" / r["file"]).read_bytes() for r in picked],
            "grounding": pa.array([r["grounding"] for r in picked], BY_NAME["grounding"].type),
            "reject_reason": pa.nulls(n, pa.string()),
        }
    )


def loop(folder: str, kind: str, batch: pa.Table, device: str, threshold: float) -> float:
    """The per-image transformers recipe; seconds."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).to(device).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for data, entries in zip(batch.column("image").to_pylist(), batch.column("grounding").to_pylist(), strict=True):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            texts = [e["phrase"] for e in entries]
            if kind == "owlv2":
                inputs = processor(text=[texts], images=image, return_tensors="pt", padding="max_length", truncation=True, max_length=16)
                outputs = model(**inputs.to(device))
                side = max(image.size)
                processor.post_process_grounded_object_detection(outputs, threshold=threshold, target_sizes=[(side, side)])
            else:
                inputs = processor(images=image, text=" . ".join(t.lower() for t in texts) + " .", return_tensors="pt").to(device)
                outputs = model(**inputs)
                processor.post_process_grounded_object_detection(
                    outputs, inputs.input_ids, threshold=threshold, text_threshold=0.25, target_sizes=[image.size[::-1]]
                )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def staged(folder: str, batch: pa.Table, args: argparse.Namespace, threshold: float, batch_size: int) -> tuple[float, int]:
    """The grounding stage (model loaded before the clock starts); seconds and boxes found."""
    options = {"detector": folder, "device": args.device, "batch_size": batch_size, "workers": args.workers}
    grounding = Grounding.from_params({**options, "threshold": threshold, "mode": "score"})
    grounding.setup()
    start = time.perf_counter()
    out = grounding.process(batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, sum(out.column("num_boxes").to_pylist())


def parts(folder: str, batch: pa.Table, args: argparse.Namespace) -> None:
    """Milliseconds per image of each part of OWLv2's work on the first image (and a batch of it)."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).to(args.device).eval()
    image = Image.open(io.BytesIO(batch.column("image")[0].as_py())).convert("RGB")
    texts = [e["phrase"] for e in batch.column("grounding")[0].as_py()]

    def timed(label: str, fn, images: int = 1) -> object:
        start = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"  {label:42} {(time.perf_counter() - start) / images * 1000:9.1f} ms per image")
        return out

    with torch.inference_mode():
        processor.image_processor(images=image, return_tensors="pt")  # warm-up
        pixels = timed("image preprocessing", lambda: processor.image_processor(images=image, return_tensors="pt")["pixel_values"])
        pixels = pixels.to(args.device)
        tokens = processor.tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt").to(args.device)
        timed(f"text queries ({len(texts)} phrases)", lambda: model.owlv2.get_text_features(**tokens))
        model.image_embedder(pixel_values=pixels)  # warm-up
        timed("vision encoder, batch 1", lambda: model.image_embedder(pixel_values=pixels))
        many = pixels.expand(args.batch_size, -1, -1, -1).contiguous()
        timed(f"vision encoder, batch {args.batch_size}", lambda: model.image_embedder(pixel_values=many), args.batch_size)
        inputs = processor(text=[texts], images=image, return_tensors="pt", padding="max_length", truncation=True, max_length=16)
        timed("whole forward, batch 1", lambda: model(**inputs.to(args.device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="decode threads of the stage")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--detectors", default="owlv2,grounding-dino")
    parser.add_argument("--parts", action="store_true", help="time OWLv2's parts instead of the stage and the loop")
    parser.add_argument("--prepare", type=Path, help="write phrases and the CLIP tokenizer here and stop")
    parser.add_argument("--prepared", type=Path, help="a folder written by --prepare (no spaCy or open_clip needed)")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if args.prepared:
        rows = json.loads((args.prepared / "phrases.json").read_text())
        tokenizer = CLIPTokenizer.from_pretrained(args.prepared / "clip_tokenizer")
    else:
        rows, tokenizer = phrases_of_photos(), None
    batch = table(rows, args.images)
    phrases = sum(len(g) for g in batch.column("grounding").to_pylist())
    print(f"{args.images} photos, {phrases / args.images:.1f} phrases per photo, device {args.device}, batch {args.batch_size}")
    words = sorted({w for r in rows for e in r["grounding"] for w in e["phrase"].lower().split()})
    with tempfile.TemporaryDirectory() as tmp:
        if args.parts:
            parts(str(save_owlv2(Path(tmp) / "owlv2", tiny=False, tokenizer=tokenizer)), batch, args)
            return
        for kind in args.detectors.split(","):
            if kind == "owlv2":
                folder, threshold = str(save_owlv2(Path(tmp) / kind, tiny=False, tokenizer=tokenizer)), 0.1
            else:
                folder, threshold = str(save_grounding_dino(Path(tmp) / kind, words, tiny=False)), 0.35
            best = {"loop": float("inf"), "stage": float("inf"), "stage 1": float("inf")}
            for _ in range(args.repeat):
                best["loop"] = min(best["loop"], loop(folder, kind, batch, args.device, threshold))
                seconds, boxes = staged(folder, batch, args, threshold, args.batch_size)
                best["stage"] = min(best["stage"], seconds)
                best["stage 1"] = min(best["stage 1"], staged(folder, batch, args, threshold, 1)[0])
            rate = {name: args.images / seconds for name, seconds in best.items()}
            print(
                f"{kind:15} stage, batch {args.batch_size}: {rate['stage']:7.3f} images/s ({boxes} boxes) | stage, batch 1: "
                f"{rate['stage 1']:7.3f} | per-image loop {rate['loop']:7.3f} | batching {rate['stage'] / rate['stage 1']:.2f}x, "
                f"stage/loop {rate['stage'] / rate['loop']:.2f}x"
            )


if __name__ == "__main__":
    main()
