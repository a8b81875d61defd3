"""Tooling over finished outputs (the engines' floor): ``mmcurate validate``."""
