"""Deduplication stages: exact image bytes (``exact_dedup``), perceptual image hashes
(``phash_dedup``) and caption near-duplicates by MinHash LSH (``minhash_dedup``).

All three are :class:`~mmcurate.stages.base.ClusterStage`: ``process`` adds a per-row hash or
signature, ``group_rows`` names candidate groups and ``verify`` confirms candidate pairs, both pure
functions of Arrow tables so every engine runs the same decision.
"""
