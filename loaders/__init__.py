"""``mmcurate.loaders``: train on an mmcurate output with PyTorch (needs torch: ``pip install 'mmcurate[models]'``).

See :class:`CuratedDataset` and docs/training.md.
"""

from mmcurate.loaders.dataset import CuratedDataset

__all__ = ["CuratedDataset"]
