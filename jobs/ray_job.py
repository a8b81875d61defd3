"""Entry point of a Ray job (``mmcurate submit`` runs ``python -m mmcurate.jobs.ray_job pipeline.yaml``
in the uploaded working_dir). Inside a job ``RAY_ADDRESS`` is set, so the run joins the cluster."""

from __future__ import annotations

import sys

from mmcurate.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:2], "--engine", "ray", *sys.argv[2:]]))
