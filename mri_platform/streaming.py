"""Training data read with Ray Data, for cohorts the driver could not hold (`--loading ray-data`).

The driver only lists the files (on local disk, or `s3://bucket/prefix` on any S3 endpoint named by the usual AWS
variables) and splits them by file, that is by volume or patient, before anything is read or augmented. Ray Data
tasks then read the files in parallel across the cluster and slice, normalise and resize them with the in-memory
path's own code (`data.file_slices`); the slices stay in Ray's object store, spread over the nodes that read them.
Each Train worker streams its shard (`ray.train.get_dataset_shard`) and cuts its random views with the same
`pipeline.SliceDataset`, feeding the same `steps.run_epoch`.

The driver holds file names and at most `HELD_OUT_SAMPLE` held-out slices, which it scores the best checkpoint on;
the workers validate every epoch on the same sample.

`mri-platform prepare SRC DST` (`write_prepared`) slices a cohort once into Parquet with a manifest; a run on DST
reads those slices, with the split made there, instead of decoding every volume again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from mri_platform.data import IMAGE_SUFFIXES, NIFTI_SUFFIXES, DataError, SliceSet, file_slices, pack
from mri_platform.pipeline import SliceDataset

HELD_OUT_SAMPLE = 512
"""Held-out slices (the first by name) that workers validate on each epoch and the driver scores at the end: the
driver's memory stays bounded whatever the cohort's size."""


MANIFEST = "manifest.json"
"""What `write_prepared` leaves beside the slices it writes: a source holding one is read as prepared slices."""
ROWS_PER_SHARD = 4096
"""Slices per Parquet file of a prepared cohort (64 MB at 64 x 64): few files, each read by one task."""


def uses_ray_data(loading: str, data: str | None) -> bool:
    """'auto' keeps the built-in data in memory (small, and faster so: see the README) and streams every other
    source with Ray Data; an s3:// source can only be streamed."""
    if loading == "auto":
        return not (data is None or data == "builtin")
    return loading == "ray-data"


def s3_filesystem():
    """pyarrow's S3FileSystem for any S3 endpoint ($AWS_ENDPOINT_URL(_S3), the usual AWS variables), with the
    timeouts and retries of checkpoint storage (:mod:`mri_platform.storage`)."""
    from mri_platform.storage import RetryingS3FileSystem, s3_options

    return RetryingS3FileSystem(**s3_options())


def _filesystem(data: str):
    """(pyarrow filesystem, root path on it) of a local path or an s3:// URL."""
    import pyarrow.fs

    if data.startswith("s3://"):
        return s3_filesystem(), data.removeprefix("s3://").rstrip("/")
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(data)


@dataclass
class FileSplit:
    """The training and held-out files of a source, split by file before anything is read."""

    train: list[str]
    """Paths on `filesystem` (bucket/key on S3)."""
    held_out: list[str]
    labels: dict[str, str]
    """Path -> short label (relative to the source's root): the group and the prefix of each slice's name."""
    filesystem: Any
    source: str
    """e.g. "nifti:s3://bucket/cohort" or "folder:/data/kaggle"."""

    def fingerprint(self) -> str:
        """Short hash of the training files' labels: the data version a run records without reading the files."""
        digest = hashlib.sha256()
        for path in self.train:
            digest.update(f"{self.labels[path]}\n".encode())
        return digest.hexdigest()[:12]


def list_files(data: str) -> tuple[list[str], dict[str, str], Any, str]:
    """(paths, labels, filesystem, source) of the files a source names: JPEG/PNG where a folder holds any, else
    NIfTI volumes (the in-memory path's rule), searched recursively, hidden files left out."""
    import pyarrow.fs

    filesystem, root = _filesystem(data)
    info = filesystem.get_file_info(root)
    if info.type == pyarrow.fs.FileType.File:
        infos, base = [info], str(PurePosixPath(root).parent)
    elif info.type == pyarrow.fs.FileType.Directory:
        infos, base = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)), root
    else:
        raise DataError(f"{data} does not exist; pass a folder (or s3://bucket/prefix) of NIfTI volumes or images")
    files = [
        i.path
        for i in infos
        if i.type == pyarrow.fs.FileType.File
        and not any(part.startswith(".") for part in PurePosixPath(i.path).relative_to(base).parts)
    ]
    images = sorted(p for p in files if p.lower().endswith(IMAGE_SUFFIXES))
    volumes = sorted(p for p in files if p.lower().endswith(NIFTI_SUFFIXES))
    chosen = images or volumes
    if not chosen:
        raise DataError(
            f"no NIfTI volumes (.nii, .nii.gz) or images ({', '.join(IMAGE_SUFFIXES)}) found in {data} "
            f"({len(files)} other files)"
        )
    labels = {p: str(PurePosixPath(p).relative_to(base)) for p in chosen}
    return chosen, labels, filesystem, f"{'folder' if images else 'nifti'}:{data}"


def _digest(row: dict[str, Any]) -> dict[str, Any]:
    return {"path": row["path"], "digest": hashlib.sha256(row["bytes"]).hexdigest()}


def _unique(paths: list[str], filesystem) -> list[str]:
    """`paths` without byte-identical copies (the Kaggle archive ships its images twice), so that no image lands on
    both sides of the split; hashed in Ray Data tasks, only the digests come back."""
    import ray.data

    ds = ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True)
    seen: dict[str, str] = {}
    for row in sorted(ds.map(_digest).take_all(), key=lambda r: r["path"]):
        seen.setdefault(row["digest"], row["path"])
    kept = set(seen.values())
    if len(kept) < len(paths):
        print(f"skipped {len(paths) - len(kept)} exact duplicate file(s)", flush=True)
    return [p for p in paths if p in kept]


def split_files(data: str, test_fraction: float = 0.2, seed: int = 0) -> FileSplit:
    """Training and held-out files, one group per file, by `data.split_by_group`'s rule with every file counted
    once (nothing is read to count slices): groups shuffled with `seed`, moved to held out until it holds at least
    `test_fraction` of the files, at least one on each side."""
    paths, labels, filesystem, source = list_files(data)
    if source.startswith("folder:"):
        paths = _unique(paths, filesystem)
    if len(paths) < 2:
        raise DataError(
            f"cannot split {source}: it holds one usable file. The split is by volume or patient so that no scan is "
            "both trained on and tested; provide at least two files."
        )
    by_label = sorted(paths, key=lambda p: labels[p])
    order = np.random.default_rng(seed).permutation(len(by_label))
    n_test = min(len(by_label) - 1, max(1, int(np.ceil(test_fraction * len(by_label)))))
    held = {by_label[i] for i in order[:n_test]}
    return FileSplit(
        train=[p for p in paths if p not in held],
        held_out=[p for p in paths if p in held],
        labels=labels,
        filesystem=filesystem,
        source=source,
    )


def read_files(paths: list[str], labels: dict[str, str], filesystem: Any, source: str, *,
               planes: tuple[str, ...], size: int | str) -> SliceSet:  # fmt: skip
    """The slices of `paths` read one file at a time in this process, as the in-memory path loads a local source:
    what `evaluate` and `promote` score (they hold their evaluation set in memory anyway), from S3 as from disk."""
    names: list[str] = []
    images: list[np.ndarray] = []
    groups: list[str] = []
    skipped: list[tuple[str, str]] = []
    for path in paths:
        with filesystem.open_input_stream(path) as stream:
            file_names, file_images, why = file_slices(stream.read(), labels[path], planes=planes, size=size)
        if why:
            skipped.append((path, why))
        names += file_names
        images += file_images
        groups += [labels[path]] * len(file_names)
    if not images:
        raise DataError(f"no usable slices in the {len(paths)} files of {source}: {skipped[:3]}")
    return SliceSet(pack(images), np.array(groups, dtype=str), names, source, skipped)


def read_source(data: str, *, planes: tuple[str, ...] = ("axial",), size: int | str = 64) -> SliceSet:
    """Every slice of a source on disk or on S3, read in this process (see `read_files`); of a prepared cohort, its
    held-out sample (its other slices were trained on), at the planes and size it was prepared with."""
    if manifest := _manifest(data):
        return _prepared_sample(data, manifest)
    paths, labels, filesystem, source = list_files(data)
    return read_files(paths, labels, filesystem, source, planes=planes, size=size)


def read_held_out(data: str, *, planes: tuple[str, ...] = ("axial",), size: int | str = 64,
                  test_fraction: float = 0.2, seed: int = 0) -> SliceSet:  # fmt: skip
    """The whole held-out split that a streamed run of the same settings leaves out of training, read in this
    process (see `read_files`); of a prepared cohort, the held-out sample its runs are scored on."""
    if manifest := _manifest(data):
        return _prepared_sample(data, manifest)
    split = split_files(data, test_fraction, seed)
    return read_files(split.held_out, split.labels, split.filesystem, split.source, planes=planes, size=size)


def _prepared_sample(data: str, manifest: dict[str, Any]) -> SliceSet:
    split = _prepared_split(data, manifest, tuple(manifest["planes"]), manifest["size"])
    return _prepared_held_out(data, split)


# ----------------------------------------------------------------------------------------------- Ray Data tasks
class _Slicer:
    """A Ray Data task's work on one file: its usable slices as rows (float32 pixels as bytes, with their shape,
    so that slices of any size share one column)."""

    def __init__(self, labels: dict[str, str], planes: tuple[str, ...], size: int | str) -> None:
        self.labels, self.planes, self.size = labels, planes, size

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        label = self.labels[row["path"]]
        names, images, skipped = file_slices(row["bytes"], label, planes=self.planes, size=self.size)
        if skipped:
            print(f"skipped {row['path']}: {skipped}", file=sys.stderr, flush=True)
        return [
            {"name": name, "group": label, "pixels": image.astype(np.float32).tobytes(),
             "height": image.shape[0], "width": image.shape[1]}
            for name, image in zip(names, images, strict=True)
        ]  # fmt: skip


def read_slices(paths: list[str], split: FileSplit, planes: tuple[str, ...], size: int | str):
    """A lazy Ray Data dataset of the slices of `paths`: one read task per file, slicing in the same task."""
    import ray.data

    ds = ray.data.read_binary_files(
        paths, filesystem=split.filesystem, include_paths=True, override_num_blocks=len(paths)
    )
    return ds.flat_map(_Slicer({p: split.labels[p] for p in paths}, tuple(planes), size))


def images_of(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The (H, W) float32 slices of a batch of rows (read-only views of the batch's bytes)."""
    return [
        np.frombuffer(pixels, dtype=np.float32).reshape(int(h), int(w))
        for pixels, h, w in zip(batch["pixels"], batch["height"], batch["width"], strict=True)
    ]


def slice_set(rows: list[dict[str, Any]], source: str) -> SliceSet:
    """Rows of `read_slices` as a SliceSet, in their order."""
    images = [np.frombuffer(r["pixels"], dtype=np.float32).reshape(int(r["height"]), int(r["width"])) for r in rows]
    return SliceSet(pack(images), np.array([str(r["group"]) for r in rows], dtype=str), [str(r["name"]) for r in rows],
                    source)  # fmt: skip


def _held_out_rows(split: FileSplit, planes: tuple[str, ...], size: int | str) -> list[dict[str, Any]]:
    """The first `HELD_OUT_SAMPLE` held-out slices by name, as rows, read from as few files as hold them.

    A slice's name starts with its file's label, so the first slices by name are those of the first files by label:
    the files are read in that order, a few first, then as many more as the slices per file so far say are missing,
    and only what was read is sorted. No sort of the whole held-out split (which read and shuffled every held-out
    file, as long as reading the training files); what the driver holds is bounded by the sample, not the cohort.
    """
    files = sorted(split.held_out, key=lambda p: split.labels[p])
    rows: list[dict[str, Any]] = []
    read, wanted = 0, 4
    while read < len(files) and len(rows) < HELD_OUT_SAMPLE:
        chunk = files[read : read + wanted]
        rows += read_slices(chunk, split, planes, size).take_all()
        read += len(chunk)
        per_file = max(1.0, len(rows) / read)
        wanted = max(1, math.ceil(1.2 * (HELD_OUT_SAMPLE - len(rows)) / per_file))
    if not rows:
        raise DataError(f"no usable slices in the {len(split.held_out)} held-out files of {split.source}")
    return sorted(rows, key=lambda r: r["name"])[:HELD_OUT_SAMPLE]


def held_out_sample(split: FileSplit, planes: tuple[str, ...], size: int | str) -> SliceSet:
    """The first `HELD_OUT_SAMPLE` held-out slices by name (see `_held_out_rows`)."""
    return slice_set(_held_out_rows(split, planes, size), split.source)


@dataclass
class Streamed:
    """A source read by Ray Data for one run: what the driver passes the trainer and records."""

    train: Any
    """ray.data.MaterializedDataset of the training files' slices, in the object store."""
    held_out: SliceSet
    """The first `HELD_OUT_SAMPLE` held-out slices by name (`held_out_sample`)."""
    n_train: int
    split: FileSplit

    def for_run(self, rows: int):
        """The training slices repeated so that one pass holds the `rows` a run trains on (epochs x steps x global
        batch): the workers' `ShardLoader` then starts one pass, not one or more per epoch. A union of the same
        blocks, which are neither copied nor read again."""
        copies = max(1, math.ceil(rows / self.n_train))
        return self.train.union(*[self.train] * (copies - 1)) if copies > 1 else self.train


def prepare(data: str, *, planes: tuple[str, ...], size: int | str, test_fraction: float, seed: int) -> Streamed:
    """Split `data`'s files, then read and slice them in Ray Data tasks on the whole cluster (before the Train
    workers take their CPUs), keeping the training slices in the object store: the driver gets references and the
    held-out sample only."""
    import ray.data

    context = ray.data.DataContext.get_current()  # travels with the datasets, to the workers' split coordinator
    context.enable_progress_bars = False  # a bar per dataset and epoch floods the log; the epoch line says enough
    manifest = _manifest(data)
    if manifest:
        return _read_prepared(data, manifest, planes, size)
    split = split_files(data, test_fraction, seed)
    train = _training_slices(split, planes, size)
    return Streamed(train, held_out_sample(split, planes, size), train.count(), split)


def _training_slices(split: FileSplit, planes: tuple[str, ...], size: int | str):
    """The training files' slices, materialized in the object store."""
    train = read_slices(split.train, split, planes, size).materialize()
    if train.count() == 0:
        raise DataError(
            f"no usable slices in the {len(split.train)} training files of {split.source}; the workers' log lines "
            "'skipped PATH: why' say what was wrong with each"
        )
    return train


def prepare_held_out(data: str, *, planes: tuple[str, ...], size: int | str, test_fraction: float, seed: int
                     ) -> SliceSet:  # fmt: skip
    """The held-out sample `prepare` gives a run of the same settings, read alone: what a search scores its best
    trial on."""
    manifest = _manifest(data)
    if manifest:
        return _prepared_held_out(data, _prepared_split(data, manifest, planes, size))
    return held_out_sample(split_files(data, test_fraction, seed), planes, size)


# ----------------------------------------------------------------------------------------------- prepared cohorts
def write_prepared(src: str, dst: str, *, planes: tuple[str, ...], size: int | str, test_fraction: float,
                   seed: int) -> dict[str, Any]:  # fmt: skip
    """Split `src`'s files by volume, slice them once in Ray Data tasks, and write the slices to `dst` (a folder or
    s3://bucket/prefix): `train/` as Parquet files of `ROWS_PER_SHARD` slices, `held_out.parquet` the held-out
    sample, and `manifest.json` (settings, split, counts). A run with `--data DST` reads these slices instead of
    decoding every volume again (see the README for what that saves). Returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split = split_files(src, test_fraction, seed)
    filesystem, root = _filesystem(dst)
    train = _training_slices(split, planes, size)
    n_train = train.count()
    train.repartition(math.ceil(n_train / ROWS_PER_SHARD)).write_parquet(f"{root}/train", filesystem=filesystem)
    held_out = _held_out_rows(split, planes, size)
    pq.write_table(pa.Table.from_pylist(held_out), f"{root}/held_out.parquet", filesystem=filesystem)
    manifest = {
        "source": split.source, "planes": list(planes), "size": size, "test_fraction": test_fraction, "seed": seed,
        "train": [split.labels[p] for p in split.train], "held_out": [split.labels[p] for p in split.held_out],
        "n_train": n_train, "n_held_out_sample": len(held_out),
    }  # fmt: skip
    with filesystem.open_output_stream(f"{root}/{MANIFEST}") as stream:
        stream.write(json.dumps(manifest, indent=1).encode())
    return manifest


def is_prepared(data: str) -> bool:
    """Whether `data` (a folder or s3://bucket/prefix) holds a cohort that `write_prepared` wrote."""
    return _manifest(data) is not None


def _manifest(data: str | None) -> dict[str, Any] | None:
    """The manifest `write_prepared` left in `data`, or None for any other source."""
    import pyarrow.fs

    if data is None or data == "builtin":
        return None
    filesystem, root = _filesystem(data)
    if filesystem.get_file_info(f"{root}/{MANIFEST}").type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(f"{root}/{MANIFEST}") as stream:
        return json.loads(stream.read())


def _prepared_split(data: str, manifest: dict[str, Any], planes: tuple[str, ...], size: int | str) -> FileSplit:
    """The split a cohort was prepared with (whatever a run's test fraction and seed), once its settings match."""
    if list(planes) != manifest["planes"] or size != manifest["size"]:
        raise DataError(
            f"{data} holds slices prepared with planes {','.join(manifest['planes'])} and size {manifest['size']}; "
            f"train with those, or prepare the cohort again for planes {','.join(planes)} and size {size}"
        )
    return FileSplit(
        train=manifest["train"],
        held_out=manifest["held_out"],
        labels={label: label for label in manifest["train"] + manifest["held_out"]},
        filesystem=_filesystem(data)[0],
        source=f"prepared:{data} (from {manifest['source']})",
    )


def _prepared_held_out(data: str, split: FileSplit) -> SliceSet:
    import pyarrow.parquet as pq

    path = f"{_filesystem(data)[1]}/held_out.parquet"
    return slice_set(pq.read_table(path, filesystem=split.filesystem).to_pylist(), split.source)


def _read_prepared(data: str, manifest: dict[str, Any], planes: tuple[str, ...], size: int | str) -> Streamed:
    import ray.data

    split = _prepared_split(data, manifest, planes, size)
    train = ray.data.read_parquet(f"{_filesystem(data)[1]}/train", filesystem=split.filesystem).materialize()
    return Streamed(train, _prepared_held_out(data, split), manifest["n_train"], split)


# ----------------------------------------------------------------------------------------------- on the worker
class ShardLoader:
    """One Train worker's batches from its Ray Data shard: exactly `steps` per epoch, each item a random view by
    `pipeline.SliceDataset`. What `steps.run_epoch` iterates in place of a DataLoader; batches are (n, 1, P, P) CPU
    tensors.

    One stream of batches serves every epoch: each pass over a streaming split starts with a barrier of all ranks and
    a new executor in its coordinator (1-2 s on 2 cores, 15 % of an epoch of 30 steps), so the driver sizes one pass
    for the whole run (`for_run`) and an epoch takes the next `steps` batches of it. Should a pass run out (a
    restarted worker's rows, rounding), the next starts; every rank steps alike."""

    sampler = None  # no DistributedSampler: Ray Data shards the rows

    def __init__(self, shard, batch_size: int, steps: int, *, rows: int, augment: bool, patch: int | None,
                 intensity: bool) -> None:  # fmt: skip
        self.shard, self.batch_size, self.steps = shard, batch_size, steps
        self.drop_last = rows >= batch_size  # a shard smaller than a batch still gives one
        self.views = {"augment": augment, "patch": patch, "intensity": intensity}
        self.shuffle_buffer = max(batch_size, min(rows, 1024))
        self._batches: Iterator[torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._batches is None:
            self._batches = self._stream()
        return itertools.islice(self._batches, self.steps)

    def _stream(self) -> Iterator[torch.Tensor]:
        seed = int(torch.randint(2**31 - 1, ()))  # run_epoch seeds torch per (seed, epoch, rank)
        for pass_number in itertools.count():
            empty = True
            for batch in self.shard.iter_batches(
                batch_size=self.batch_size, batch_format="numpy", drop_last=self.drop_last,
                local_shuffle_buffer_size=self.shuffle_buffer, local_shuffle_seed=seed + pass_number,
            ):  # fmt: skip
                empty = False
                views = SliceDataset(pack(images_of(batch)), self.views["augment"], patch=self.views["patch"],
                                     intensity=self.views["intensity"])  # fmt: skip
                yield torch.stack([views[i] for i in range(len(views))])
            if empty:
                raise RuntimeError("this worker's Ray Data shard is empty: fewer training slices than workers")
