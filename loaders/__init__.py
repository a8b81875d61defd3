"""``mmcurate.loaders``: train on an mmcurate output with PyTorch (needs torch: ``pip install 'mmcurate[models]'``).

See :class:`CuratedDataset` and docs/training.md.
"""

from mmcurate.loaders.dataset import GROUNDED_FORMATS, CuratedDataset

__all__ = ["GROUNDED_FORMATS", "CuratedDataset"]
