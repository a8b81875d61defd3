"""docs/cluster.md's walkthrough, followed as a person would: a Ray head (``ray start --head``), input and
output on S3 (moto's server), credentials passed to the job only with ``submit --env``, ``--wait``, then
``validate``, ``stats``, ``report`` and ``diff`` on the ``s3://`` output; and the cluster files it starts from."""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from mmcurate.cli import main
from mmcurate.tests.support.foundation import laion_csv_with_repeats, write_yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "cluster"


@pytest.mark.slow
def test_from_a_ray_head_to_a_finished_job_on_s3(s3, s3_server: dict[str, str], laion_sample: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("ray")
    from mmcurate.tests.support.ray_head import ray_head

    fs, bucket = s3
    urls = laion_csv_with_repeats(laion_sample, tmp_path / "urls.csv", 90)
    fs.put_file(str(urls), f"{bucket}/in/urls.csv")
    pipeline = write_yaml(tmp_path / "pipeline.yaml", {"output": {"rows_per_shard": 30}, "stages": ["caption_quality", "minhash_dedup"]})
    columns = ["--url-col", "URL", "--caption-col", "TEXT"]
    curated = f"{bucket}/curated"
    # the head's own environment points at no S3 server: only the job's --env reaches moto
    nowhere = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}
    with ray_head(nowhere) as head:
        credentials = [f"--env={name}={value}" for name, value in s3_server.items()]
        job = ["--address", head.address, "--python", sys.executable, "--job-id", "walkthrough"]
        where = ["--input", f"{bucket}/in/urls.csv", *columns, "--output", curated]
        code = main(["submit", str(pipeline), *where, *job, *credentials, "--wait"])
        printed = capsys.readouterr()
        assert code == 0, printed.out[-3000:] + printed.err
        assert "walkthrough SUCCEEDED" in printed.out

    fs.invalidate_cache()
    assert main(["validate", curated]) == 0
    assert capsys.readouterr().out == "valid\n"
    assert main(["stats", curated, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert main(["report", curated, "-o", str(tmp_path / "curated.html"), "--samples", "4"]) == 0
    report = json.loads((tmp_path / "curated.json").read_text())
    assert report["summary"]["kept"] == stats["kept"] > 0
    assert "minhash_dedup" in json.dumps(stats)  # every 7th caption repeats the one before: the dedup rejected rows

    # the same pipeline on this machine's local engine: the job's output agrees with it
    assert main(["run", str(pipeline), "--input", str(urls), *columns, "--output", str(tmp_path / "local"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["diff", curated, str(tmp_path / "local")]) == 0


def _extras() -> set[str]:
    return set(metadata.metadata("mmcurate").get_all("Provides-Extra"))


def _installed_extras(command: str) -> set[str]:
    """The extras of every ``mmcurate[...]`` requirement in a shell command."""
    return {extra for group in re.findall(r"mmcurate\[([^\]]+)\]", command) for extra in group.split(",")}


def _ray_version() -> str:
    """The release the ray extra asks for at least, as X.Y.Z (the version the example clusters run)."""
    ray = next(r for r in metadata.requires("mmcurate") if r.startswith("ray[") and 'extra == "ray"' in r)
    floor = re.search(r">=([\d.]+)", ray).group(1)
    return floor + ".0" * (2 - floor.count("."))


def test_the_cluster_launcher_file_installs_mmcurate_on_every_node() -> None:
    config = yaml.safe_load((EXAMPLES / "ray-aws.yaml").read_text())
    assert config["head_node_type"] in config["available_node_types"]
    setup = " ".join(config["setup_commands"])
    assert {"ray", "s3"} <= _installed_extras(setup) <= _extras()
    assert f"ray[default,data]=={_ray_version()}" in setup
    workers = {name: node for name, node in config["available_node_types"].items() if name != config["head_node_type"]}
    assert sum(node["max_workers"] for node in workers.values()) <= config["max_workers"]
    assert any(node["min_workers"] >= 1 for name, node in workers.items() if "gpu" in name)  # CUDA is chosen at the run's start


def test_the_kuberay_cluster_runs_the_image_of_the_dockerfile() -> None:
    cluster = yaml.safe_load((EXAMPLES / "kuberay.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["enableInTreeAutoscaling"] is True
    version = cluster["spec"]["rayVersion"]
    assert version == _ray_version()
    dockerfile = (EXAMPLES / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{version}-" in dockerfile
    assert {"ray", "s3"} <= _installed_extras(dockerfile) <= _extras()
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith(f":{version}")
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
