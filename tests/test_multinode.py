"""A real Ray cluster of two nodes on this machine (`ray.cluster_utils.Cluster`: two raylets, 1 CPU each): a training
run and a search read real MRI volumes from SeaweedFS S3 with Ray Data, train on both nodes, checkpoint to S3 and
land in an MLflow server. The driver never loads the volumes (load_splits is made to fail)."""

import json

import boto3
import numpy as np
import pytest

from mri_platform import data, tracking
from mri_platform.checkpoints import load_checkpoint
from mri_platform.config import build_config

pytestmark = pytest.mark.slow

# The built-in data's real volumes: the MNI152 T1 template (nilearn) and the EPI / b0 volumes (nibabel, dipy).
VOLUMES = (data._MNI, *data._HELD_OUT_VOLUMES)


@pytest.fixture(scope="module")
def s3(s3_server):
    """The S3 server's client settings, in the environment of this process and of the nodes started after it."""
    env = {"AWS_ENDPOINT_URL": s3_server.url, "AWS_ACCESS_KEY_ID": s3_server.extra["access_key"],
           "AWS_SECRET_ACCESS_KEY": s3_server.extra["secret_key"], "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield s3_server


@pytest.fixture(scope="module")
def cohort(s3) -> str:
    """s3://BUCKET/cohort holding the four real volumes, uploaded as they ship."""
    bucket = s3.extra["bucket"]
    client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=s3.extra["access_key"],
                          aws_secret_access_key=s3.extra["secret_key"], region_name="us-east-1")  # fmt: skip
    for package, relative in VOLUMES:
        path = data._package_file(package, relative)
        client.upload_file(str(path), bucket, f"cohort/{path.name}")
    return f"s3://{bucket}/cohort"


@pytest.fixture(scope="module")
def two_nodes(s3):
    """A head (1 CPU and the trial drivers' TRAIN_DRIVER slots) and a second node (1 CPU) joined to it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"TRAIN_DRIVER": 4}})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def driver_never_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the driver loaded the data set")

    for name in ("load_splits", "load_nifti", "load_folder", "load_any"):
        monkeypatch.setattr(data, name, refuse)


def _s3_keys(s3, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=s3.extra["access_key"],
                          aws_secret_access_key=s3.extra["secret_key"], region_name="us-east-1")  # fmt: skip
    return [o["Key"] for o in client.list_objects_v2(Bucket=s3.extra["bucket"], Prefix=prefix).get("Contents", [])]


def test_training_on_two_nodes_from_s3(two_nodes, cohort, s3, mlflow_server, driver_never_loads):
    from mri_platform.train import fit

    config = build_config(
        None, model="ae1", filters=8, epochs=2, steps_per_epoch=4, workers=2, lr=3e-3, data=cohort,
        planes=("axial", "coronal"), tracking_uri=mlflow_server.url, storage=f"s3://{s3.extra['bucket']}/multinode",
        registered_model="multinode-denoiser",
    )  # fmt: skip
    assert config.ray_data  # 'auto' streams every source but the built-in data
    result = fit(config)

    assert [h["epoch"] for h in result.history] == [1, 2]
    run = tracking.client(mlflow_server.url).get_run(result.run_id)
    nodes = run.data.tags["worker_nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1], "the two workers should run on different nodes"
    assert {n["NodeID"] for n in __import__("ray").nodes()} == set(nodes)
    assert result.registered_version == "1"
    keys = _s3_keys(s3, f"multinode/{result.run_name}/")
    assert any(k.endswith("checkpoint.pt") for k in keys), keys
    _, meta = load_checkpoint(result.checkpoint_path)
    assert meta["data"]["source"] == f"nifti:{cohort}" and meta["data"]["loading"] == "ray-data"
    assert meta["data"]["n_train"] > 50 and meta["data"]["n_val"] > 0


def test_a_search_on_two_nodes_from_s3(two_nodes, cohort, s3, mlflow_server, driver_never_loads):
    from tuning.search import SearchConfig, run_search

    search = SearchConfig(models=["ae1"], filters=[8], epochs=(1, 1), lr=(3e-3, 3e-3), samples=2,
                          workers_per_trial=1, max_concurrent=2, scheduler="fifo", search="random")  # fmt: skip
    overrides = {"data": cohort, "steps_per_epoch": 4, "tracking_uri": mlflow_server.url,
                 "storage": f"s3://{s3.extra['bucket']}/multinode-sweeps"}  # fmt: skip
    summary = run_search(search, overrides, registered_model="multinode-sweep")

    assert summary["n_trials"] == 2 and summary["n_failed"] == 0 and summary["max_concurrent"] == 2
    assert summary["registered_version"] == "1"
    client = tracking.client(mlflow_server.url)
    nested = client.search_runs(
        [tracking.experiment_id(mlflow_server.url, "mri-denoising")],
        f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'",
    )
    assert len(nested) == 2
    nodes = {r.data.tags["worker_nodes"] for r in nested}
    assert len(nodes) == 2, f"the two trials' workers should run on different nodes: {nodes}"
    assert any(k.endswith("checkpoint.pt") for k in _s3_keys(s3, f"multinode-sweeps/{summary['name']}"))


def test_evaluate_and_promote_read_s3_data_as_they_read_it_from_disk(cohort, s3, tmp_path, native_checkpoint):
    from typer.testing import CliRunner

    from mri_platform import streaming
    from mri_platform.cli import app

    local = tmp_path / "cohort"
    local.mkdir()
    for package, relative in VOLUMES:
        path = data._package_file(package, relative)
        (local / path.name).write_bytes(path.read_bytes())
    from_s3, from_disk = streaming.read_source(cohort), data.load_any(str(local))
    assert len(from_s3) == len(from_disk) > 100 and from_s3.source == f"nifti:{cohort}"
    assert sorted(from_s3.names) == sorted(from_disk.names)
    by_name = dict(zip(from_disk.names, from_disk.images, strict=True))
    assert all(np.array_equal(image, by_name[name]) for name, image in zip(from_s3.names, from_s3.images, strict=True))

    held_out = streaming.read_held_out(cohort)
    split = streaming.split_files(cohort)
    assert set(held_out.groups) == {split.labels[p] for p in split.held_out}  # the files a streamed run left out

    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        app, ["evaluate", "--model-uri", str(native_checkpoint), "--data", cohort, "--json", str(report)]
    )
    assert result.exit_code == 0, result.output
    scored = json.loads(report.read_text())
    assert scored["n_images"] == len(from_s3) and scored["psnr"] > scored["noisy_psnr"] + 3
