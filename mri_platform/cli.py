"""`mri-platform`: a thin command line that builds typed configs and calls the platform's modules."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mri_platform import stack  # importing it starts nothing

RAYLET_WORKER_COUNT_WARNING = r"worker processes have been started on node"
"""The raylet's 'N PYTHON worker processes have been started ... 4x the maximum expected startup concurrency'."""

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split(":")[1].strip())
stack_app = typer.Typer(add_completion=False, no_args_is_help=True)
app.add_typer(
    stack_app, name="stack", help="Run the platform on this machine: Ray head, MLflow server, S3 (SeaweedFS), Bento."
)


@app.callback()
def _quiet_downloads() -> None:
    """Denoise brain MRI: train on Ray, track in MLflow, evaluate and promote models."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file floods the terminal
    # The raylet warns once 4x as many worker processes as cores have started. A search's trial drivers, Train
    # controllers and workers are that many by design on a small machine; the line calls for no action. Read by Ray
    # when it is first imported, which no command has done yet.
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAYLET_WORKER_COUNT_WARNING)


NoiseVariance = Annotated[
    float | None, typer.Option(help="Gaussian noise variance (the report: 0.2). Exclusive with --noise-std.")
]
NoiseStd = Annotated[float | None, typer.Option(help="Gaussian noise std (the report's code: 0.2 = variance 0.04).")]
NoiseKind = Annotated[str | None, typer.Option(help="'gaussian' or 'rician' (MRI magnitude noise).")]
NoClip = Annotated[bool, typer.Option("--no-clip", help="Do not clip noisy images to [0, 1].")]
TrackingUri = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in .state/)."),
]
Data = Annotated[str | None, typer.Option(help="'builtin', a folder of JPEG/PNG images, or NIfTI file(s)/folder.")]
TrainData = Annotated[
    str | None,
    typer.Option(
        help="'builtin', a folder of JPEG/PNG images, or NIfTI file(s)/folder, on disk or s3://bucket/prefix "
        "(any S3 endpoint: AWS_ENDPOINT_URL and keys)."
    ),
]
Loading = Annotated[
    str | None,
    typer.Option(
        help="auto (default: the built-in data in memory, any other source with Ray Data), memory (the driver "
        "loads the slices), or ray-data (Ray Data tasks read and slice the files; workers stream their shards)."
    ),
]
Planes = Annotated[str, typer.Option(help="NIfTI planes to slice, comma-separated: axial,coronal,sagittal.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the result as JSON to this file.")]
WaitForResources = Annotated[
    float | None,
    typer.Option(
        help="Seconds to wait for the workers' CPUs/GPUs to join the Ray cluster (an autoscaler adding nodes) "
        "before failing (default 0: fail at once)."
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _noise(variance: float | None, std: float | None, kind: str | None, no_clip: bool, default=None):
    """A NoiseConfig from the options, or `default` when none was given."""
    from mri_platform.noise import NoiseConfig

    if variance is not None and std is not None:
        raise ValueError("give --noise-variance or --noise-std, not both")
    if variance is None and std is None and kind is None and not no_clip:
        return default
    base = default or NoiseConfig()
    kwargs = {"kind": kind or base.kind, "clip": base.clip and not no_clip}
    if std is not None:
        return NoiseConfig.from_std(std, **kwargs)
    return NoiseConfig(variance=variance if variance is not None else base.variance, **kwargs)


def _views(config) -> str:
    """'64 x 64 slices' / '64 x 64 patches of native slices', and the steps per epoch when fixed."""
    size = "native" if config.size == "native" else f"{config.size} x {config.size}"
    views = f"{config.patch} x {config.patch} patches of {size} slices" if config.patch else f"{size} slices"
    return views + (f", {config.steps_per_epoch} steps per epoch" if config.steps_per_epoch else "")


def _write_json(path: Path | None, payload: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        typer.echo(f"wrote {path}")


def _fit_resuming(config, times: int):
    """fit(config), resumed from its last checkpoint up to `times` times if it fails for a storage or worker reason."""
    import dataclasses

    from mri_platform.train import TrainingFailed, fit

    for attempt in range(1, times + 2):
        try:
            return fit(config)
        except TrainingFailed as exc:
            if exc.kind is None or attempt > times:
                raise
            typer.secho(
                f"run {exc.run_name} failed ({exc.kind}: {exc.reason}); resuming it from its last checkpoint "
                f"(auto-resume {attempt} of {times})",
                fg=typer.colors.YELLOW,
            )
            config = dataclasses.replace(config, run_name=exc.run_name, resume=True)


@app.command()
def train(
    model: Annotated[
        str | None, typer.Option(help="unet or dncnn (residual nets), ae1 or ae2 (the report's autoencoders).")
    ] = None,
    filters: Annotated[int | None, typer.Option(help="Override the model's width.")] = None,
    depth: Annotated[int | None, typer.Option(help="Override DnCNN's layers or the U-Net's levels.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the report's 50 for AE1, 70 for AE2).")] = None,
    steps_per_epoch: Annotated[
        int | None, typer.Option(help="Optimiser steps per epoch (default: one pass over the slices).")
    ] = None,
    size: Annotated[
        str | None, typer.Option(help="Slice side: 64 (the report's, default), any N, or 'native' (needs --patch).")
    ] = None,
    patch: Annotated[int | None, typer.Option(help="Train on random N x N patches instead of whole slices.")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="constant or cosine (default: cosine for unet/dncnn, constant for ae1/ae2).")
    ] = None,
    intensity_augment: Annotated[
        bool | None,
        typer.Option(
            "--intensity-augment/--no-intensity-augment",
            help="Random gamma and brightness (default: on for unet/dncnn).",
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers (data-parallel ranks).")] = None,
    gpu: Annotated[bool | None, typer.Option("--gpu/--cpu", help="One GPU per worker, NCCL, mixed precision.")] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="GPUs per worker with --gpu (a fraction only with one worker).")
    ] = None,
    wait_for_resources: WaitForResources = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size, split across workers.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16 (GPU).")] = None,
    data: TrainData = None,
    loading: Loading = None,
    planes: Planes = "axial",
    noise_variance: NoiseVariance = None,
    noise_std: NoiseStd = None,
    noise_kind: NoiseKind = None,
    no_clip: NoClip = False,
    tracking_uri: TrackingUri = None,
    storage: Annotated[str | None, typer.Option(help="Checkpoint folder or s3://bucket/prefix.")] = None,
    preset: Annotated[str | None, typer.Option(help="demo, report, gpu, or a YAML file of settings.")] = None,
    run_name: Annotated[str | None, typer.Option(help="Name of the Ray Train run (unique by default).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue --run-name from its last checkpoint.")] = False,
    auto_resume: Annotated[
        int,
        typer.Option(
            min=0,
            help="Resume a run that still failed for a storage or worker reason (after Ray Train's own restarts) "
            "from its last checkpoint, up to N times; 0 stops at the first failure.",
        ),
    ] = 2,
    registered_model: Annotated[str | None, typer.Option(help="Registry name (default mri-denoiser).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of split, weights, augmentation and noise.")] = None,
    json_out: JsonOut = None,
) -> None:
    """Train a denoiser data-parallel on Ray Train; log, score and register it in MLflow."""
    from mri_platform.config import build_config
    from mri_platform.data import DataError

    try:
        base = build_config(preset)
        config = build_config(
            preset,
            model=model, filters=filters, depth=depth, epochs=epochs, steps_per_epoch=steps_per_epoch, size=size,
            patch=patch, schedule=schedule, intensity_augment=intensity_augment, workers=workers, gpu=gpu,
            gpus_per_worker=gpus_per_worker, wait_for_resources=wait_for_resources, batch_size=batch_size, lr=lr,
            precision=precision, data=data, loading=loading, planes=tuple(planes.split(",")),
            noise=_noise(noise_variance, noise_std, noise_kind, no_clip, default=base.noise),
            tracking_uri=tracking_uri, storage=storage, run_name=run_name, resume=resume or None,
            registered_model=registered_model, seed=seed,
        )  # fmt: skip
    except (ValueError, DataError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(
        f"training {config.model.upper()} ({config.model_config.architecture}, {config.model_config.filters} filters) "
        f"for {config.num_epochs} epochs on {config.workers} {'GPU' if config.gpu else 'CPU'} worker(s), "
        f"{_views(config)}, noise {config.noise.describe()}"
    )
    try:
        result = _fit_resuming(config, auto_resume)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise _fail(str(exc), code=1) from exc
    metrics = result.metrics
    typer.secho(
        f"\nheld-out PSNR {metrics['psnr']:.2f} dB (noisy input {metrics['noisy_psnr']:.2f} dB), "
        f"SSIM {metrics['ssim']:.3f}, MSE {metrics['mse']:.5f}; best epoch {metrics['best_epoch']}; "
        f"{metrics['images_per_s']:.0f} img/s; {result.train_time_s:.0f} s",
        fg=typer.colors.GREEN,
    )
    typer.echo(f"MLflow run {result.run_id}; model {result.model_uri}; registered version {result.registered_version}")
    typer.echo(f"figure: {result.figure_path}")
    _write_json(json_out, result.to_json())


def _read_by_file(data: str | None) -> bool:
    """Whether evaluate and promote read `data` with the streaming module's reader: an S3 source, or a cohort that
    `prepare` wrote (on S3 or on disk), whose slices are Parquet rather than images or volumes."""
    if not data or data == "builtin":
        return False
    if data.startswith("s3://"):
        return True
    from mri_platform.streaming import is_prepared

    return is_prepared(data)


@app.command()
def evaluate(
    model_uri: Annotated[
        str, typer.Option(help="models:/mri-denoiser@champion, models:/NAME/VERSION, or a checkpoint.")
    ],
    data: TrainData = "builtin",
    planes: Planes = "axial",
    noise_variance: NoiseVariance = None,
    noise_std: NoiseStd = None,
    noise_kind: NoiseKind = None,
    no_clip: NoClip = False,
    seed: Annotated[int, typer.Option(help="Seed of the fixed evaluation noise.")] = 1234,
    size: Annotated[
        str, typer.Option(help="Slice side: 64 (the benchmark protocol) or 'native' (each slice at its own size).")
    ] = "64",
    baselines: Annotated[
        bool,
        typer.Option(
            help="Also score Gaussian blur, total variation, NL-means and BM3D (if installed), plain and with the "
            "clipping bias inverted, strengths tuned once on the training split."
        ),
    ] = False,
    figure: Annotated[Path | None, typer.Option(help="Save original / noisy / restored to this PNG.")] = None,
    tracking_uri: TrackingUri = None,
    json_out: JsonOut = None,
) -> None:
    """Score a model on any data source with fixed-seed noise (default: the noise it was trained against)."""
    from mri_platform.baselines import describe_params
    from mri_platform.data import DataError, load_any
    from mri_platform.evaluate import evaluate as run_evaluation

    try:
        noise = _noise(noise_variance, noise_std, noise_kind, no_clip)
        if _read_by_file(data):
            from mri_platform.streaming import read_source

            slices = read_source(data, planes=tuple(planes.split(",")), size=size)
        else:
            slices = load_any(data, planes=tuple(planes.split(",")), size=size)
        report = run_evaluation(
            model_uri,
            slices,
            noise=noise,
            seed=seed,
            baselines=baselines,
            figure=figure,
            tracking_uri=tracking_uri,
        )
    except (ValueError, DataError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"{report['n_images']} images from {report['data_source']}, noise {report['noise']['description']}")
    rows = [
        ("noisy input", report["noisy_psnr"], report["noisy_ssim"], ""),
        ("model", report["psnr"], report["ssim"], ""),
    ]
    best = report.get("best_baseline")
    skipped = {name: s["skipped"] for name, s in report.get("baselines", {}).items() if "skipped" in s}
    for name, s in report.get("baselines", {}).items():
        if name not in skipped:
            params = describe_params(s["params"])
            rows.append((name, s["psnr"], s["ssim"], params + ("  <- best baseline" if name == best else "")))
    typer.echo(f"{'':24s} {'PSNR dB':>8s} {'SSIM':>6s}  {'parameters (tuned on training slices)' if best else ''}")
    for name, psnr, ssim, note in rows:
        typer.echo(f"{name:24s} {psnr:8.2f} {ssim:6.3f}  {note}".rstrip())
    for name, reason in skipped.items():
        typer.echo(f"{name}: skipped, {reason}")
    if report["skipped"]:
        typer.echo(f"skipped {len(report['skipped'])} unreadable inputs: {report['skipped'][:5]}")
    _write_json(json_out, report)


@app.command()
def promote(
    version: Annotated[list[str], typer.Option(help="Candidate registry version(s); repeat to compare several.")],
    name: Annotated[str, typer.Option(help="Registered model name.")] = "mri-denoiser",
    data: TrainData = "builtin",
    noise_variance: NoiseVariance = None,
    noise_std: NoiseStd = None,
    seed: Annotated[int, typer.Option(help="Seed of the fixed evaluation noise.")] = 1234,
    tracking_uri: TrackingUri = None,
    json_out: JsonOut = None,
) -> None:
    """Move the champion alias to the best candidate, only if it beats the current champion on the same images."""
    from mri_platform.data import DataError, load_splits
    from mri_platform.evaluate import promote as run_promotion

    try:
        noise = _noise(noise_variance, noise_std, None, False)
        if _read_by_file(data):  # the held-out files of the split a streamed run made, or a prepared cohort's sample
            from mri_platform.streaming import read_held_out

            held_out = read_held_out(data)
        else:
            held_out = load_splits(data)[1]
        outcome = run_promotion(name, version, held_out, noise=noise, seed=seed, tracking_uri=tracking_uri)
    except (ValueError, DataError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    for v, s in outcome["scores"].items():
        typer.echo(f"version {v}: PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.3f}")
    color = typer.colors.GREEN if outcome["promoted"] else typer.colors.YELLOW
    typer.secho(("promoted: " if outcome["promoted"] else "not promoted: ") + outcome["reason"], fg=color)
    typer.echo(f"champion: models:/{name}@champion -> version {outcome['champion']}")
    _write_json(json_out, outcome)


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="Training preset for the models.")] = "demo",
    search_preset: Annotated[str, typer.Option(help="Search preset; 'none' skips the search.")] = "demo",
    models: Annotated[str, typer.Option(help="Models to train before the search, comma-separated.")] = "ae1,unet",
    tracking_uri: TrackingUri = None,
    serve: Annotated[bool, typer.Option(help="End serving the champion and the MLflow UI in the background.")] = True,
) -> None:
    """The main job: train AE1 and the U-Net on the built-in data, promote the better, search, serve the champion."""
    from mri_platform.demo import run_demo

    try:
        run_demo(
            preset,
            tracking_uri,
            None if search_preset == "none" else search_preset,
            serve=serve,
            models=tuple(m.strip() for m in models.split(",")),
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise _fail(str(exc), code=1) from exc


@app.command()
def build(
    model_uri: Annotated[
        str, typer.Option(help="Registry URI of the model to serve: models:/NAME@ALIAS or models:/NAME/VERSION.")
    ] = "models:/mri-denoiser@champion",
    tracking_uri: TrackingUri = None,
    json_out: JsonOut = None,
) -> None:
    """Import a registered model into BentoML's store and build the Bento (offline); its tag names the version."""
    from service.build import build as build_bento

    try:
        result = build_bento(model_uri, tracking_uri)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise _fail(str(exc), code=1) from exc
    meta = result["metadata"]
    scores = f"held-out PSNR {meta['psnr']:.2f} dB, SSIM {meta['ssim']:.3f}" if meta["psnr"] is not None else ""
    typer.secho(f"built Bento {result['bento']} from {meta['model_uri']} ({meta['model_kind'] or 'custom'}, "
                f"{meta['filters']} filters; {scores})", fg=typer.colors.GREEN)  # fmt: skip
    typer.echo(f"BentoML store: {result['bentoml_home']}")
    typer.echo(f"serve it:      mri-platform serve   (or: BENTOML_HOME={result['bentoml_home']} bentoml serve "
               f"{result['bento']})")  # fmt: skip
    _write_json(json_out, result)


@app.command()
def serve(
    bento: Annotated[str | None, typer.Option(help="Bento name or tag (default: the latest built).")] = None,
    port: Annotated[int, typer.Option(help="HTTP port.")] = 3000,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the service to the network.")] = (
        "127.0.0.1"
    ),
) -> None:
    """Serve the built Bento with `bentoml serve` in the foreground (Ctrl-C stops it)."""
    from mri_platform.config import bentoml_home
    from mri_platform.executables import find_bentoml

    os.environ["BENTOML_HOME"] = str(bentoml_home())
    tag, missing = stack.built_bento(bento or stack.BENTO)
    if tag is None:
        raise _fail(missing)
    typer.echo(f"serving {tag} on http://{host}:{port}  (page: http://{host}:{port}/ui, model: /info)")
    cli = find_bentoml()
    os.execvpe(cli, [cli, "serve", tag, "--host", host, "--port", str(port)], os.environ)


def _int_list(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",")] if text else None


def _pair(text: str | None, kind: type) -> tuple | None:
    if not text:
        return None
    parts = text.replace("-", ",", 1).split(",") if kind is int else text.split(",")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"expected LOW,HIGH, got {text!r}")
    return tuple(kind(p) for p in parts)


@app.command()
def tune(
    preset: Annotated[str | None, typer.Option(help="Search preset: demo, full, or a YAML file.")] = None,
    models: Annotated[str | None, typer.Option(help="Models to choose from, e.g. unet,dncnn,ae1.")] = None,
    filters: Annotated[
        str | None, typer.Option(help="Widths for every model, e.g. 32,64 (default: each model's x0.5, x1, x1.5).")
    ] = None,
    epochs: Annotated[str | None, typer.Option(help="Epoch range LOW-HIGH, e.g. 50-70.")] = None,
    lr: Annotated[str | None, typer.Option(help="Learning-rate range LOW,HIGH (log-uniform).")] = None,
    samples: Annotated[int | None, typer.Option(help="Number of trials.")] = None,
    workers_per_trial: Annotated[int | None, typer.Option(help="Ray Train workers per trial.")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(help="GPUs per worker (0: CPUs).")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Trials at once (default: what fits).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="asha (early stopping) or fifo.")] = None,
    grace_period: Annotated[int | None, typer.Option(help="ASHA: epochs before a trial may be stopped.")] = None,
    reduction_factor: Annotated[int | None, typer.Option(help="ASHA: keep 1/N of trials per rung.")] = None,
    search: Annotated[str | None, typer.Option(help="optuna (TPE, seeded) or random.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the search algorithm.")] = None,
    data: TrainData = None,
    loading: Loading = None,
    noise_variance: NoiseVariance = None,
    noise_std: NoiseStd = None,
    tracking_uri: TrackingUri = None,
    storage: Annotated[str | None, typer.Option(help="Checkpoint folder or s3://bucket/prefix.")] = None,
    name: Annotated[str | None, typer.Option(help="Sweep name (default: unique); --resume continues it.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the sweep --name where it stopped.")] = False,
    registered_model: Annotated[str, typer.Option(help="Registry name.")] = "mri-denoiser",
    wait_for_resources: WaitForResources = None,
    json_out: JsonOut = None,
) -> None:
    """Search model, width, epochs and learning rate with Ray Tune (each trial a Ray Train run); promote the best."""
    from mri_platform.data import DataError
    from tuning.search import build_search, print_table, run_search

    try:
        config = build_search(
            preset, models=models.split(",") if models else None, filters=_int_list(filters),
            epochs=_pair(epochs, int), lr=_pair(lr, float), samples=samples,
            workers_per_trial=workers_per_trial, gpus_per_worker=gpus_per_worker, max_concurrent=max_concurrent,
            scheduler=scheduler, grace_period=grace_period, reduction_factor=reduction_factor, search=search, seed=seed,
        )  # fmt: skip
        noise = _noise(noise_variance, noise_std, None, False)
        overrides = {"data": data, "loading": loading, "noise": noise, "tracking_uri": tracking_uri, "storage": storage,
                     "wait_for_resources": wait_for_resources}  # fmt: skip
        summary = run_search(
            config,
            {k: v for k, v in overrides.items() if v is not None},
            name=name,
            resume=resume,
            registered_model=registered_model,
        )
    except (ValueError, DataError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    except RuntimeError as exc:
        raise _fail(str(exc), code=1) from exc
    print_table(summary)
    _write_json(json_out, summary)


@app.command("export-slices")
def export_slices(
    out: Annotated[Path, typer.Argument(help="The .npy file to write.")],
    size: Annotated[str, typer.Option(help="64 (whole slices, the report's size), any N, or 'native'.")] = "64",
    split: Annotated[str, typer.Option(help="train (the MNI152 slices models learn from) or held-out.")] = "train",
) -> None:
    """Write the built-in MRI slices to a .npy file, for machines without the data packages (benchmarks/gpu_train.py).

    (N, S, S) float32 at a fixed size; at native size an object array of (H, W) slices (load with allow_pickle).
    """
    import numpy as np

    from mri_platform.data import DataError, load_builtin

    if split not in ("train", "held-out"):
        raise _fail(f"--split must be 'train' or 'held-out', got {split!r}")
    try:
        train_set, held_out = load_builtin(size)
    except (ValueError, DataError) as exc:
        raise _fail(str(exc)) from exc
    images = (train_set if split == "train" else held_out).images
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, images, allow_pickle=images.dtype == object)
    shapes = sorted({tuple(image.shape) for image in images})
    sizes = f"{shapes[0][0]} x {shapes[0][1]}" if len(shapes) == 1 else f"{len(shapes)} sizes"
    typer.echo(f"wrote {len(images)} {split} slices ({sizes}) to {out}")


@app.command("prepare")
def prepare_cohort(
    src: Annotated[str, typer.Argument(help="A folder of NIfTI volumes or JPEG/PNG images, or s3://bucket/prefix.")],
    dst: Annotated[str, typer.Argument(help="Where the slices go: a folder or s3://bucket/prefix (then --data DST).")],
    planes: Planes = "axial",
    size: Annotated[str, typer.Option(help="Slice side: 64 (the report's), any N, or 'native'.")] = "64",
    test_fraction: Annotated[float, typer.Option(help="Held-out share of the files, split by volume.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
) -> None:
    """Slice a cohort once and write it as Parquet with a manifest: runs with --data DST read the slices instead of
    decoding every volume (with Ray Data; the split is the one made here, by volume)."""
    from mri_platform.cluster import init_ray
    from mri_platform.data import DataError
    from mri_platform.streaming import write_prepared

    init_ray({"CPU": 1})
    try:
        manifest = write_prepared(src, dst, planes=tuple(planes.split(",")), size=int(size) if size.isdigit() else size,
                                  test_fraction=test_fraction, seed=seed)  # fmt: skip
    except (ValueError, DataError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(
        f"wrote {manifest['n_train']} training slices of {len(manifest['train'])} files and a held-out sample of "
        f"{manifest['n_held_out_sample']} slices of {len(manifest['held_out'])} files to {dst}"
    )


# ------------------------------------------------------------------------------------------------ stack


def _print_stack(info: dict[str, Any]) -> None:
    """The plain view: what runs where, then lines to paste; secrets by file, never printed."""
    typer.echo(f"stack in {info['stack_dir']}")
    details = {
        "ray": f"dashboard and job server; GCS {info['ray_gcs_address']}",
        "mlflow": f"store {info['mlflow_backend_store_uri']}, artifacts {info['mlflow_artifacts_destination']}"
        + (
            f"; login {stack.MLFLOW_USERNAME}, password in {info['mlflow_password_file']}"
            if info["mlflow_password_file"]
            else ""
        ),
        "s3": f"bucket {info['s3_bucket']}, its keys in {info['s3_credentials_file']}",
        "bento": f"{info['bento_tag']}",
    }
    for name in stack.COMPONENTS:
        entry = info["services"].get(name)
        if entry is None:
            typer.echo(f"  {name:<7} not running")
        elif entry["state"] != "running":
            typer.echo(f"  {name:<7} {entry['state']} (was {entry['url']}, pid {entry['pid']}; log {entry['log']})")
        else:
            typer.echo(f"  {name:<7} {entry['url']:<24} pid {entry['pid']:<8} {details[name]}")
    if info["exports"]:
        typer.echo("\nto use it from a shell:")
        for line in info["exports"]:
            typer.echo(f"  {line}")
    if info["ray_dashboard"]:
        typer.echo("  ray job submit --working-dir . -- python -m mri_platform train --model ae1")
    if info["services"]:
        typer.echo(f"\nlogs: {info['stack_dir']}/<service>.log; stop it all with `mri-platform stack down`")


@stack_app.command("up")
def stack_up(
    only: Annotated[
        str | None, typer.Option(help="Components to run, comma-separated, among ray,mlflow,s3,bento (default: all).")
    ] = None,
    embedded: Annotated[
        bool,
        typer.Option(
            "--embedded", help="Serve the tracking store training uses by default (sqlite in the state folder)."
        ),
    ] = False,
    backend_store_uri: Annotated[
        str | None, typer.Option(help="MLflow's backend store (default: sqlite in the stack folder).")
    ] = None,
    artifacts_destination: Annotated[
        str | None, typer.Option(help="MLflow's artifact store (default: s3://mri-platform/mlflow on the stack's S3).")
    ] = None,
    ray_dashboard_port: Annotated[int, typer.Option(help="Ray dashboard and job server port.")] = stack.DEFAULT_PORTS[
        "ray"
    ],
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port.")] = stack.DEFAULT_PORTS["mlflow"],
    s3_port: Annotated[int, typer.Option(help="SeaweedFS S3 gateway port.")] = stack.DEFAULT_PORTS["s3"],
    bento_port: Annotated[int, typer.Option(help="Bento HTTP port.")] = stack.DEFAULT_PORTS["bento"],
    ray_cpus: Annotated[int | None, typer.Option(help="CPUs the Ray head offers (default: all).")] = None,
    bento: Annotated[str, typer.Option(help="Bento to serve from the store: a name or name:version.")] = stack.BENTO,
    timeout: Annotated[float, typer.Option(help="Seconds each server may take to become ready.")] = 90,
) -> None:
    """Start the platform's servers on 127.0.0.1, or find them running; print where they are."""
    if embedded and backend_store_uri:
        raise _fail("give --embedded or --backend-store-uri, not both", code=2)
    started = time.monotonic()
    try:
        info = stack.up(
            (only or ",".join(stack.COMPONENTS)).split(","),
            ray_dashboard_port=ray_dashboard_port,
            mlflow_port=mlflow_port,
            s3_port=s3_port,
            bento_port=bento_port,
            backend_store_uri=stack.embedded_store_uri() if embedded else backend_store_uri,
            artifacts_destination=artifacts_destination,
            ray_cpus=ray_cpus,
            bento=bento,
            timeout=timeout,
            progress=typer.echo,
        )
    except ValueError as exc:
        raise _fail(str(exc), code=2) from exc
    except stack.StackError as exc:
        raise _fail(str(exc), code=1) from exc
    for name, action in info["actions"].items():
        typer.echo(f"{name}: {action}")
    for note in info["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"ready in {time.monotonic() - started:.1f} s\n")
    _print_stack(info)


@stack_app.command("status")
def stack_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (URLs null when not running).")] = False,
) -> None:
    """Say what runs where, and how to reach it."""
    try:
        info = stack.status()
    except stack.StackError as exc:
        raise _fail(str(exc), code=1) from exc
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    elif not info["services"]:
        typer.echo(f"no stack is running (state in {info['stack_dir']}); start one with `mri-platform stack up`")
    else:
        _print_stack(info)


@stack_app.command("down")
def stack_down(
    timeout: Annotated[
        float, typer.Option(help="Seconds each server gets to stop gracefully before it is killed.")
    ] = stack.STOP_TIMEOUT,
) -> None:
    """Stop exactly what `stack up` started; the data stays in the stack folder for the next `up`."""
    started = time.monotonic()
    try:
        record = stack.load()
        stopped = stack.down(timeout)
    except stack.StackError as exc:
        raise _fail(str(exc), code=1) from exc
    if not record:
        typer.echo("no stack is running; nothing to stop")
        return
    for name in stopped:
        typer.echo(f"stopped {name} (pid {record[name].pid}, {record[name].url})")
    if exited := [name for name in record if name not in stopped]:
        typer.echo(f"already exited: {', '.join(exited)} (cleaned up what they left)")
    typer.echo(f"down in {time.monotonic() - started:.1f} s")
