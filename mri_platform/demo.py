"""The main job on the built-in data: train the report's AE1 and the platform's U-Net on Ray Train, register both,
promote the better, search the zoo with Ray Tune, and set the champion beside the best tuned classical filter."""

from __future__ import annotations

import json
import time

from mri_platform.config import build_config, state_dir
from mri_platform.data import load_builtin
from mri_platform.evaluate import EVAL_SEED, promote
from mri_platform.tracking import resolve_tracking_uri
from mri_platform.train import fit

MODELS = ("ae1", "unet")
"""The report's model, for comparison, and the platform's default (64 x 64 patches of native slices)."""


def run_demo(
    preset: str = "demo",
    tracking_uri: str | None = None,
    search_preset: str | None = "demo",
    serve: bool = True,
    models: tuple[str, ...] = MODELS,
) -> dict:
    from mri_platform.baselines import baseline_scores
    from mri_platform.cluster import init_ray
    from tuning.search import build_search, print_table, run_search

    started = time.perf_counter()
    init_ray({})  # one local cluster for training and the search, with the resource Tune's trial drivers take
    results = {}
    for model in models:
        config = build_config(preset, model=model, tracking_uri=tracking_uri)
        print(f"\n== {model.upper()}: {config.num_epochs} epochs on {config.workers} CPU workers ==", flush=True)
        results[model] = fit(config)
    uri = resolve_tracking_uri(tracking_uri)
    train_set, held_out = load_builtin()  # 64 x 64: the benchmark protocol, on which every model is compared
    outcome = promote(
        config.registered_model, [r.registered_version for r in results.values()], held_out, tracking_uri=uri
    )
    sweep = None
    if search_preset:
        print(f"\n== search ({search_preset} preset): model, width, epochs and learning rate with Ray Tune ==")
        sweep = run_search(build_search(search_preset), {"tracking_uri": uri}, registered_model=config.registered_model,
                           gate_slices=held_out)  # fmt: skip
        print_table(sweep)
    print("\n== classical filters, tuned on the training slices, on the same held-out slices ==", flush=True)
    classical = baseline_scores(held_out, config.noise, EVAL_SEED, tune_on=train_set, variants="best")
    served = _serve(config.registered_model, uri) if serve else None
    champion = sweep["champion_version"] if sweep else outcome["champion"]
    final = sweep["promotion"] if sweep and sweep["promotion"] else outcome
    summary = {
        "tracking_uri": uri,
        "served": served,
        "models": {name: r.to_json() for name, r in results.items()},
        "promotion": outcome,
        "search": sweep,
        "champion": champion,
        "champion_scores": final["scores"][champion],
        "baselines": classical,
        "noise": config.noise.describe(),
        "n_images": len(held_out),
        "elapsed_s": time.perf_counter() - started,
    }
    out = state_dir() / "demo.json"
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _print_summary(summary, out)
    return summary


def _serve(registered_model: str, uri: str) -> dict:
    """Build the champion's Bento and leave the MLflow UI and the Bento running in the background."""
    from mri_platform import stack
    from service.build import build

    print("\n== serving: the champion as a Bento, and the MLflow UI ==", flush=True)
    bento = build(f"models:/{registered_model}@champion", uri)
    print(f"built Bento {bento['bento']} from {bento['metadata']['model_uri']}", flush=True)
    try:
        status = stack.up(("mlflow", "bento"), backend_store_uri=uri, bento=bento["bento"], progress=print)
    except stack.StackError as exc:  # a port taken, say: the training results are kept all the same
        return {"bento": bento["bento"], "error": str(exc)}
    return {
        "bento": bento["bento"],
        "mlflow": status["mlflow"],
        "mlflow_password_file": status["mlflow_password_file"],
        "endpoint": status["bento"],
    }


def _print_summary(summary: dict, out) -> None:
    from mri_platform.baselines import describe_params

    promotion, sweep, classical = summary["promotion"], summary["search"], summary["baselines"]
    scores = {**promotion["scores"], **((sweep or {}).get("promotion") or {}).get("scores", {})}
    print(f"\n== results: {summary['n_images']} built-in held-out slices at 64 x 64, noise {summary['noise']} ==")
    print(f"{'':56s} {'version':>7s} {'PSNR dB':>8s} {'SSIM':>6s} {'train s':>8s}")
    first = next(iter(summary["models"].values()))
    print(f"{'noisy input':56s} {'':>7s} {first['noisy_psnr']:8.2f} {first['noisy_ssim']:6.3f}")
    best = classical["best_baseline"]
    for name, result in classical["baselines"].items():
        if "psnr" in result:
            label = f"{name} ({describe_params(result.get('params'))})"
            marker = "  <- best classical" if name == best else ""
            print(f"{label:56s} {'':>7s} {result['psnr']:8.2f} {result['ssim']:6.3f}{marker}")
    for name, r in summary["models"].items():
        s = scores[str(r["registered_version"])]
        print(f"{name:56s} {r['registered_version']!s:>7s} {s['psnr']:8.2f} {s['ssim']:6.3f} {r['train_time_s']:8.0f}")
    if sweep and sweep.get("registered_version"):
        version, config = sweep["registered_version"], sweep["best_config"]
        s = scores[str(version)]
        label = f"search best ({config['model']}, {config['filters']})"
        print(f"{label:56s} {version!s:>7s} {s['psnr']:8.2f} {s['ssim']:6.3f}")
    print(f"\npromotion after training: {promotion['reason']}")
    if sweep and sweep["promotion"]:
        print(f"promotion after the search: {sweep['promotion']['reason']}")
    champion = summary["champion_scores"]
    margin = champion["psnr"] - classical["baselines"][best]["psnr"]
    print(
        f"champion:  models:/{promotion['name']}@champion -> version {summary['champion']}: "
        f"{champion['psnr']:.2f} dB, {margin:+.2f} dB against the best classical filter ({best})"
    )
    uri, served = summary["tracking_uri"], summary["served"]
    print("\nwhere to look:")
    if served and not served.get("error"):
        endpoint = served["endpoint"]
        print(f"  MLflow UI:    {served['mlflow']}   (runs, metrics, figures, the registry)")
        if served.get("mlflow_password_file"):
            print(f"                login mri-platform, password in {served['mlflow_password_file']}")
        print(f"  web page:     {endpoint}/ui   (upload a scan, see it denoised)")
        print(f"  endpoint:     {endpoint}/denoise  (also /denoise_image, /denoise_volume; API docs: {endpoint}/)")
        print(f"  model info:   curl {endpoint}/info")
        print("  both run in the background: `make down` (or `mri-platform stack down`) stops them")
    else:
        if served:
            print(f"  (not serving: {served['error']})")
        print(f"  MLflow UI:    .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  -> http://127.0.0.1:5000")
    for name, r in summary["models"].items():
        print(f"  {name} figure:   {r['figure_path']}")
    print(f"  summary:      {out}  ({summary['elapsed_s']:.0f} s)")
