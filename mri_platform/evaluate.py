"""Scoring models (and classical baselines) on fixed-seed noisy images, and promoting the best to champion.

Every score says which noise made it; the noise is drawn from a fixed seed so two models, or a model and a
baseline, are compared on identical corrupted images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from mri_platform.checkpoints import FILENAME, checkpoint_noise, load_checkpoint
from mri_platform.data import SliceSet
from mri_platform.metrics import score
from mri_platform.models import restore
from mri_platform.noise import NoiseConfig, corrupted

EVAL_SEED = 1234  # the same default as TrainConfig.eval_seed: training's validation and `evaluate` agree


def load_model(uri_or_path: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model from a checkpoint file/folder or any MLflow model URI (models:/name@alias, models:/name/3, runs:/...)."""
    path = Path(uri_or_path)
    if path.exists():
        return load_checkpoint(path)
    if "://" not in uri_or_path and not uri_or_path.startswith("models:/"):
        raise FileNotFoundError(
            f"{uri_or_path} is neither an existing checkpoint path nor a model URI "
            "such as models:/mri-denoiser@champion"
        )
    return load_checkpoint(download_checkpoint(uri_or_path, tracking_uri))


def download_checkpoint(model_uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """The checkpoint file inside a logged model (models:/..., runs:/...), downloaded into ``dst`` (default: a new
    temporary folder)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from mri_platform.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst or tempfile.mkdtemp()))
    except MlflowException as exc:
        raise ValueError(f"cannot load {model_uri} from the tracking store {uri}: {exc.message}") from exc
    found = sorted(Path(local).rglob(FILENAME))
    if not found:
        raise ValueError(f"{model_uri} holds no {FILENAME}: it was not logged by mri-platform")
    return found[0]


def score_model(model: torch.nn.Module, slices: SliceSet, noise: NoiseConfig, seed: int = EVAL_SEED) -> dict:
    """The model's MSE / PSNR / SSIM on `slices` corrupted with fixed-seed noise, beside the noisy input's."""
    pairs = corrupted(slices, noise, seed)
    clean = [c for c, _ in pairs]
    scores = score([restore(model, n) for _, n in pairs], clean)
    noisy_scores = score([n.clamp(0, 1) for _, n in pairs], clean)
    return {
        **scores,
        "noisy_psnr": noisy_scores["psnr"],
        "noisy_ssim": noisy_scores["ssim"],
        "noisy_mse": noisy_scores["mse"],
        "n_images": len(slices),
    }


def evaluate(
    model_uri: str,
    slices: SliceSet,
    *,
    noise: NoiseConfig | None = None,
    seed: int = EVAL_SEED,
    baselines: bool = False,
    figure: str | Path | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Score a model on a data source; the noise defaults to the noise the model was trained against."""
    model, meta = load_model(model_uri, tracking_uri)
    noise = noise or checkpoint_noise(meta)
    report: dict[str, Any] = {
        "model_uri": model_uri,
        "model": meta["model"],
        "data_source": slices.source,
        "skipped": [list(item) for item in slices.skipped],
        "noise": noise.to_dict() | {"std": noise.std, "description": noise.describe()},
        "seed": seed,
        **score_model(model, slices, noise, seed),
    }
    if baselines:  # classical filters tuned on the training split: "baselines" and "best_baseline"
        from mri_platform.baselines import baseline_scores

        report |= baseline_scores(slices, noise, seed)
    if figure:
        from mri_platform.figures import comparison_figure

        report["figure"] = str(comparison_figure(model, slices, noise, seed=seed, path=figure))
    return report


def promote(
    name: str,
    versions: list[str],
    slices: SliceSet,
    *,
    noise: NoiseConfig | None = None,
    seed: int = EVAL_SEED,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Score the candidate versions and the current champion on the same fixed evaluation set, and move the
    champion alias to the best candidate only if it beats the champion (strictly higher PSNR)."""
    from mri_platform import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    current = tracking.champion_version(uri, name)
    scored: dict[str, dict[str, Any]] = {}
    models = {}
    for version in dict.fromkeys([*map(str, versions), *([current] if current else [])]):
        models[version] = load_model(f"models:/{name}/{version}", uri)
    if noise is None:
        noises = {checkpoint_noise(models[str(v)][1]) for v in versions}
        if len(noises) > 1:
            raise ValueError(
                "the candidates were trained against different noise; give --noise-variance or --noise-std "
                "so that they are compared on one corruption"
            )
        noise = noises.pop()
    for version, (model, _) in models.items():
        scored[version] = score_model(model, slices, noise, seed)
    best = max(map(str, versions), key=lambda v: scored[v]["psnr"])
    promoted = current is None or (best != current and scored[best]["psnr"] > scored[current]["psnr"])
    if promoted:
        tracking.set_champion(uri, name, best)
    if current is None:
        reason = f"version {best} (best of {', '.join(map(str, versions))}) is the first champion"
    elif best == current:
        reason = f"version {best} is already the champion"
    elif promoted:
        reason = (
            f"version {best} beats champion {current}: {scored[best]['psnr']:.2f} > {scored[current]['psnr']:.2f} dB"
        )
    else:
        reason = f"version {best} does not beat champion {current}: {scored[best]['psnr']:.2f} <= " \
                 f"{scored[current]['psnr']:.2f} dB"  # fmt: skip
    return {
        "name": name,
        "promoted": promoted,
        "previous_champion": current,
        "champion": best if promoted else current,
        "best_candidate": best,
        "reason": reason,
        "noise": noise.describe(),
        "data_source": slices.source,
        "n_images": len(slices),
        "scores": {v: {k: s[k] for k in ("psnr", "ssim", "mse")} for v, s in scored.items()},
    }
