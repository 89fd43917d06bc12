"""The results table on the built-in data: every model of the zoo against every tuned classical filter.

Each model is trained through the platform's own path (Ray Train, 2 CPU workers) with a training preset (`demo`:
minutes per model; `report`: the report's epochs for AE1 / AE2 and ~20 minutes for the residual nets), at the
report's noise (variance 0.2, clipped) and at its code's (std 0.2, clipped). Everything is scored on the 59
built-in held-out slices at 64 x 64 with the same fixed-seed noise: the noisy input, the classical filters with
their parameters tuned on the training slices for that noise (with and without the inverse of the clipping bias),
and the models. The last column is each model's margin over the best classical filter.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from mri_platform.baselines import baseline_scores, describe_params
from mri_platform.checkpoints import load_checkpoint
from mri_platform.config import build_config
from mri_platform.data import load_builtin
from mri_platform.evaluate import EVAL_SEED, score_model
from mri_platform.metrics import score
from mri_platform.models import num_parameters
from mri_platform.noise import NoiseConfig, corrupted
from mri_platform.train import fit

NOISES = {"variance 0.2 (report)": NoiseConfig(variance=0.2), "std 0.2 (report's code)": NoiseConfig.from_std(0.2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="training preset: demo (minutes) or report (longer)")
    parser.add_argument("--models", default="ae1,ae2,dncnn,unet", help="models of the zoo, comma-separated")
    parser.add_argument("--noises", default="all", help="'all', 'report' (variance 0.2) or 'code' (std 0.2)")
    args = parser.parse_args()
    import ray

    noises = {k: v for k, v in NOISES.items() if args.noises == "all" or (args.noises == "code") == ("code" in k)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    train_set, held_out = load_builtin()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MRI_PLATFORM_HOME"] = folder
        for label, noise in noises.items():
            pairs = corrupted(held_out, noise, EVAL_SEED)  # what every row below is scored on
            rows.append((label, "noisy input", score([n.clamp(0, 1) for _, n in pairs], [c for c, _ in pairs]),
                         "", None, None))  # fmt: skip
            classical = baseline_scores(held_out, noise, EVAL_SEED, tune_on=train_set)
            best = classical["baselines"][classical["best_baseline"]]["psnr"]
            for name, b in classical["baselines"].items():
                if "psnr" in b:
                    rows.append((label, name, b, describe_params(b.get("params")), None, b["psnr"] - best))
            for model in args.models.split(","):
                config = build_config(args.preset, model=model, noise=noise, registered_model="",
                                      tracking_uri=f"sqlite:///{folder}/mlflow.db")  # fmt: skip
                result = fit(config)
                trained = load_checkpoint(result.checkpoint_path)[0]
                scores = score_model(trained, held_out, noise, EVAL_SEED)  # the 64 x 64 protocol
                n_params = num_parameters(trained)
                views = f"{config.patch}px patches, native" if config.patch else f"{config.size}px slices"
                steps = f"{config.num_epochs} x {config.steps_per_epoch or 'pass'}"
                rows.append((label, model, scores, f"{n_params:,} params; {views}; {steps} steps",
                             result.train_time_s, scores["psnr"] - best))  # fmt: skip
                print(f"{label}: {model} {scores['psnr']:.2f} dB in {result.train_time_s:.0f} s", flush=True)
    ray.shutdown()
    _print(rows, len(held_out), args.preset)


def _print(rows: list, n_images: int, preset: str) -> None:
    print(f"\nbuilt-in held-out split: {n_images} slices at 64 x 64, fixed-seed noise; PSNR with data_range 1.0; "
          f"SSIM Gaussian 11x11; models trained with the {preset!r} preset on 2 CPU workers")  # fmt: skip
    print("| noise | method | PSNR dB | SSIM | MSE | vs best classical dB | train s | settings |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for label, name, s, settings, seconds, margin in rows:
        margin_text = f"{margin:+.2f}" if margin is not None else ""
        seconds_text = f"{seconds:.0f}" if seconds else ""
        print(f"| {label} | {name} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['mse']:.5f} | {margin_text} | "
              f"{seconds_text} | {settings} |")  # fmt: skip
    print("the report (its own test split): AE1 MSE 0.0106, PSNR ~18.8 dB; AE2 MSE 0.0087, PSNR ~19.9 dB")


if __name__ == "__main__":
    main()
