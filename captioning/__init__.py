"""CapFilt (synthetic captions from a BLIP-style captioner, filtered by ITM / CLIP similarity) and
grounding (noun phrases to boxes) stages belong here; they are planned, not yet built."""
