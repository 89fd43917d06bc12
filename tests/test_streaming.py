"""The Ray Data path on a local Ray cluster: files split by volume before reading, the held-out sample read without
sorting the whole split, and each worker's batches streamed from one pass of its shard for the whole run."""

import gc
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from mri_platform import data, streaming

# The built-in data's real volumes: the MNI152 T1 template (nilearn) and the EPI / b0 volumes (nibabel, dipy).
VOLUMES = (data._MNI, *data._HELD_OUT_VOLUMES)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> str:
    """Eight files: each real volume twice, under two names (two scans of one subject, as far as a split knows)."""
    folder = tmp_path_factory.mktemp("cohort")
    for package, relative in VOLUMES:
        path = data._package_file(package, relative)
        for copy in ("a", "b"):
            shutil.copy(path, folder / f"{copy}_{path.name}")
    return str(folder)


def test_prepare_splits_by_file_and_holds_the_first_held_out_slices_by_name(local_ray, cohort, monkeypatch):
    monkeypatch.setattr(streaming, "HELD_OUT_SAMPLE", 40)  # fewer than one held-out volume's slices
    streamed = streaming.prepare(cohort, planes=("axial", "coronal"), size=32, test_fraction=0.25, seed=0)
    split = streamed.split

    assert len(split.held_out) == 2 and not set(split.train) & set(split.held_out)
    in_memory_train = data.load_nifti(split.train, planes=("axial", "coronal"), size=32)
    assert streamed.n_train == len(in_memory_train)
    everything_held_out = data.load_nifti(split.held_out, planes=("axial", "coronal"), size=32)
    first = np.argsort(everything_held_out.names, kind="stable")[:40]
    assert streamed.held_out.names == [everything_held_out.names[i] for i in first]
    np.testing.assert_allclose(streamed.held_out.images, everything_held_out.images[first], atol=1e-6)
    assert set(streamed.held_out.groups) <= {split.labels[p] for p in split.held_out}


def _rows(n: int, side: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"name": f"s{i:03d}", "group": "g", "pixels": rng.random((side, side), dtype=np.float32).tobytes(),
             "height": side, "width": side} for i in range(n)]  # fmt: skip


class _CountingShard:
    """A worker's shard that counts the passes started over it."""

    def __init__(self, shard) -> None:
        self.shard, self.passes = shard, 0

    def iter_batches(self, **kwargs):
        self.passes += 1
        return self.shard.iter_batches(**kwargs)


def _epochs(dataset, *, epochs: int, steps: int, batch: int, rows: int) -> list[tuple[list[list[tuple]], int]]:
    """Two ranks' ShardLoaders over `dataset` for `epochs` epochs, run side by side as Train workers run (a pass
    over a streaming split waits for every rank): per rank, each epoch's batch shapes and the passes started."""
    shards = [_CountingShard(s) for s in dataset.streaming_split(2, equal=True)]
    results: list = [None, None]

    def rank(r: int) -> None:
        loader = streaming.ShardLoader(shards[r], batch, steps, rows=rows, augment=True, patch=None, intensity=False)
        shapes = []
        for epoch in range(epochs):
            torch.manual_seed(epoch)
            shapes.append([(tuple(b.shape), float(b.min()) >= 0 and float(b.max()) <= 1) for b in loader])
        results[r] = (shapes, shards[r].passes)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(r is not None for r in results), "a rank did not finish its epochs"
    gc.collect()  # close the loaders' unfinished streams while Ray is up (their iterators report to its stats actor)
    return results


def test_every_epoch_takes_its_steps_from_one_pass_sized_for_the_run(local_ray):
    import ray.data

    epochs, steps, batch, n = 3, 4, 4, 24  # 12 rows per rank: a pass of the bare data lasts 3 of 4 steps
    train = ray.data.from_items(_rows(n, 16)).materialize()
    streamed = streaming.Streamed(train, held_out=None, n_train=n, split=None)
    whole_run = streamed.for_run(epochs * steps * batch * 2)

    for dataset, passes in ((whole_run, 1), (train, 4)):  # 48 rows per rank: 4 passes of 12 without the union
        for shapes, started in _epochs(dataset, epochs=epochs, steps=steps, batch=batch, rows=n // 2):
            assert shapes == [[((batch, 1, 16, 16), True)] * steps] * epochs
            assert started == passes


def test_a_prepared_cohort_gives_a_run_the_same_slices_without_its_volumes(
    local_ray, cohort, tmp_path, native_checkpoint
):
    from typer.testing import CliRunner

    from mri_platform.cli import app

    source, prepared = tmp_path / "source", tmp_path / "prepared"
    shutil.copytree(cohort, source)
    done = CliRunner().invoke(app, ["prepare", str(source), str(prepared), "--size", "32", "--test-fraction", "0.25"])
    assert done.exit_code == 0, done.output
    direct = streaming.prepare(str(source), planes=("axial",), size=32, test_fraction=0.25, seed=0)
    shutil.rmtree(source)  # a run on prepared slices needs nothing of the volumes

    # the split is the prepared one, whatever the run's fraction and seed
    streamed = streaming.prepare(str(prepared), planes=("axial",), size=32, test_fraction=0.5, seed=7)
    assert streamed.n_train == direct.n_train == streamed.train.count()
    assert streamed.split.fingerprint() == direct.split.fingerprint()
    assert sorted(r["name"] for r in streamed.train.take_all()) == sorted(r["name"] for r in direct.train.take_all())
    assert streamed.held_out.names == direct.held_out.names
    np.testing.assert_array_equal(streamed.held_out.images, direct.held_out.images)
    held_out = streaming.prepare_held_out(str(prepared), planes=("axial",), size=32, test_fraction=0.2, seed=0)
    assert held_out.names == direct.held_out.names
    with pytest.raises(data.DataError, match="prepared with planes axial and size 32"):
        streaming.prepare(str(prepared), planes=("axial",), size=64, test_fraction=0.25, seed=0)
    # evaluate and promote score the held-out sample too, at the size it was prepared at
    for scored in (streaming.read_source(str(prepared)), streaming.read_held_out(str(prepared))):
        assert scored.names == direct.held_out.names and scored.images.shape[1:] == (32, 32)
    # and so does the command, from the folder on disk as from S3
    report = tmp_path / "report.json"
    args = ["evaluate", "--model-uri", str(native_checkpoint), "--data", str(prepared), "--json", str(report)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert json.loads(report.read_text())["n_images"] == len(direct.held_out.names)
