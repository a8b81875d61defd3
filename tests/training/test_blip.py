"""Curated output trains a captioner: a tiny BLIP captioner through mmcurate.loaders; the loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mmcurate.loaders import CuratedDataset
from mmcurate.tests.support.training import fell


def test_blip_captioner_trains_through_the_loader(pipeline_output: Path, tiny_blip_models: dict) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_blip_models["captioner"])
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_models["captioner"])
    tokenizer = processor.tokenizer
    dataset = CuratedDataset(
        str(pipeline_output), caption=0.5, shuffle=True, transform=lambda im: processor(images=im, return_tensors="pt")["pixel_values"][0]
    )
    loader = DataLoader(dataset, batch_size=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    losses, sources = [], set()
    try:
        model.train()
        for epoch in range(8):
            dataset.set_epoch(epoch)
            for batch in loader:
                sources.update(batch["caption_source"])
                text = tokenizer(batch["caption"], padding="longest", truncation=True, max_length=32, return_tensors="pt")
                ids = text["input_ids"].clone()
                ids[:, 0] = tokenizer.bos_token_id  # BLIP's decoder starts from [DEC], not [CLS]
                labels = ids.masked_fill(text["attention_mask"] == 0, -100)
                loss = model(pixel_values=batch["image"], input_ids=ids, attention_mask=text["attention_mask"], labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert sources == {"web", "synthetic"}  # the mix reached the model
    first, last = fell(losses)
    assert last < 0.85 * first, losses  # label-smoothed cross-entropy: about 4.3 down to 3.1 here
    sizes = json.loads((pipeline_output / "shards" / "sizes.json").read_text())
    assert len(losses) == 8 * -(-sum(sizes.values()) // 8)  # every kept sample, every epoch
