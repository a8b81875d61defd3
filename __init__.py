"""mmcurate: curate web image-text pairs into clean, deduplicated training shards.

The package root has no import-time side effects; import submodules for what you need.
"""

__version__ = "0.1.0"
