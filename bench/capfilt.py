"""CapFilt throughput: the capfilt stage against a naive Hugging Face loop, in the same run.

Models: full-size BLIP-large captioner (``BlipForConditionalGeneration``) and BLIP-large ITM
(``BlipForImageTextRetrieval``): ViT-L/16 at 384 px + BERT-base text, random weights (they do not
change the cost) and a locally written 30,524-token vocabulary, saved to a temporary folder that
the stage loads. Data: real photos (``tests/data/images``) repeated to ``--images``.

The naive loop is how Data-Juicer's captioning and ITM operators do it: per sample, one
``generate`` call per synthetic caption (nucleus sampling, batch 1) and one ITM forward per
candidate caption (the web one and each synthetic one), fp32. The stage decodes ahead in threads,
encodes each image once per model, samples all captions of a batch in one ``generate`` and scores
all candidates of a batch in one ITM pass (bf16 on a GPU). Both generate ``--max-length`` new
tokens at most (random weights rarely stop early, so both pay about the full length).

With ``--device cuda`` it also times the models alone: captioner generate + ITM forward on
tensors already on the GPU, at the stage's batch size, so the pipeline's overhead shows.

    python bench/capfilt.py [--images 6] [--batch-size 8] [--device cpu] [--num-captions 3]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

from mmcurate.captioning.capfilt import Capfilt

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "images"
PROMPT = "a picture of "


def photos(n: int) -> tuple[list[str], list[bytes], list[str]]:
    files = sorted(p for p in DATA.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    picked = [files[i % len(files)] for i in range(n)]
    return [f"{i:06d}" for i in range(n)], [p.read_bytes() for p in picked], [p.stem.replace("_", " ") for p in picked]


def save_blip_large(folder: Path) -> tuple[str, str]:
    """Random BLIP-large captioner and ITM with a local 30,524-token BERT vocabulary."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words = ["a", "picture", "of", "the", "dog", "cat", "man", "woman", "on", "with", "and", "in"]
    vocab = specials + words + [f"tok{i}" for i in range(30524 - len(specials) - len(words))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        vision_config={
            "image_size": 384,
            "patch_size": 16,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "encoder_hidden_size": 1024,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
            "pad_token_id": 0,
            "sep_token_id": 3,
        },
        projection_dim=256,
    )
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer)
    paths = []
    for name, cls in (("captioner", BlipForConditionalGeneration), ("itm", BlipForImageTextRetrieval)):
        torch.manual_seed(0)
        cls(config).save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
        paths.append(str(folder / name))
    return paths[0], paths[1]


def naive(captioner: str, itm: str, images: list[bytes], webs: list[str], args: argparse.Namespace) -> float:
    """Data-Juicer style: per sample, one generate per synthetic caption, one ITM call per candidate."""
    processor = BlipProcessor.from_pretrained(captioner)
    cap = BlipForConditionalGeneration.from_pretrained(captioner).to(args.device).eval()
    match = BlipForImageTextRetrieval.from_pretrained(itm).to(args.device).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for data, web in zip(images, webs, strict=True):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            texts = [web]
            for _ in range(args.num_captions):
                inputs = processor(images=image, text=PROMPT, return_tensors="pt").to(args.device)
                out = cap.generate(
                    **inputs, do_sample=True, top_p=0.9, repetition_penalty=1.1, max_new_tokens=args.max_length, min_new_tokens=5
                )
                texts.append(processor.decode(out[0], skip_special_tokens=True)[len(PROMPT) :].strip())
            for text in texts:
                inputs = processor(images=image, text=text, return_tensors="pt").to(args.device)
                match(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[:, 1].item()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def stage(
    captioner: str, itm: str, keys: list[str], images: list[bytes], webs: list[str], args: argparse.Namespace
) -> tuple[float, Capfilt]:
    capfilt = Capfilt.from_params(
        {
            "captioner": captioner,
            "filter_model": itm,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": args.device,
            "num_captions": args.num_captions,
            "max_length": args.max_length,
            "mode": "score",
        }
    )
    capfilt.setup()
    table = pa.table({"key": keys, "image": images, "caption": webs, "reject_reason": pa.nulls(len(keys), pa.string())})
    start = time.perf_counter()
    capfilt.process(table)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, capfilt


def model_only(capfilt: Capfilt, keys: list[str], images: list[bytes], webs: list[str], args: argparse.Namespace) -> float:
    """The stage's generate + ITM calls on batches already prepared and on the GPU."""
    rows = [capfilt.prepare({"key": k, "image": d, "caption": w}) for k, d, w in zip(keys, images, webs, strict=True)]
    for row in rows:
        row["pixels"], row["scored"] = row["pixels"].to(capfilt.device), row["scored"].to(capfilt.device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        with capfilt.inference():
            capfilt.infer(rows[i : i + args.batch_size])
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="decode threads of the stage")
    parser.add_argument("--num-captions", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=30, help="new tokens per caption at most")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keys, images, webs = photos(args.images)
    print(
        f"{args.images} images, BLIP-large captioner + ITM (random weights), {args.num_captions} captions each, "
        f"device {args.device}, torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        captioner, itm = save_blip_large(Path(tmp))
        print(f"built and saved the models in {time.perf_counter() - start:.0f} s")
        naive(captioner, itm, images[:1], webs[:1], args)  # warm-up (first-call allocations)
        naive_s = naive(captioner, itm, images, webs, args)
        stage(captioner, itm, keys[:2], images[:2], webs[:2], args)
        stage_s, capfilt = stage(captioner, itm, keys, images, webs, args)
        print(f"naive HF loop (Data-Juicer style, batch 1, fp32): {args.images / naive_s:7.3f} images/s  ({naive_s:.1f} s)")
        print(
            f"capfilt stage (batch {args.batch_size}, {args.workers} decode threads): "
            f"{args.images / stage_s:7.3f} images/s  ({stage_s:.1f} s)"
        )
        print(f"speed-up: {naive_s / stage_s:.2f}x")
        if args.device.startswith("cuda"):
            model_s = model_only(capfilt, keys, images, webs, args)
            print(
                f"models alone (tensors on the GPU, batch {args.batch_size}): {args.images / model_s:7.3f} images/s; "
                f"stage at {model_s / stage_s:.0%} of it"
            )


if __name__ == "__main__":
    main()
