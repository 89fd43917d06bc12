"""The main job on the built-in data: train AE1 and AE2 briefly on Ray Train, register both, promote the better."""

from __future__ import annotations

import json
import time

from mri_platform.config import build_config, state_dir
from mri_platform.data import load_any
from mri_platform.evaluate import promote
from mri_platform.tracking import resolve_tracking_uri
from mri_platform.train import fit


def run_demo(
    preset: str = "demo", tracking_uri: str | None = None, search_preset: str | None = "demo", serve: bool = True
) -> dict:
    from tuning.search import build_search, init_ray, print_table, run_search

    started = time.perf_counter()
    init_ray()  # one local cluster for training and the search, with the resource Tune's trial drivers take
    results = {}
    for model in ("ae1", "ae2"):
        config = build_config(preset, model=model, tracking_uri=tracking_uri)
        print(f"\n== {model.upper()}: {config.num_epochs} epochs on {config.workers} CPU workers ==", flush=True)
        results[model] = fit(config)
    uri = resolve_tracking_uri(tracking_uri)
    outcome = promote(
        config.registered_model,
        [r.registered_version for r in results.values()],
        load_any("builtin"),
        tracking_uri=uri,
    )
    sweep = None
    if search_preset:
        print(f"\n== search ({search_preset} preset): width, epochs and learning rate with Ray Tune ==", flush=True)
        sweep = run_search(build_search(search_preset), {"tracking_uri": uri}, registered_model=config.registered_model)
        print_table(sweep)
    served = _serve(config.registered_model, uri) if serve else None
    summary = {
        "tracking_uri": uri,
        "served": served,
        "models": {name: r.to_json() for name, r in results.items()},
        "promotion": outcome,
        "search": sweep,
        "champion": sweep["champion_version"] if sweep else outcome["champion"],
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
    return {"bento": bento["bento"], "mlflow": status["mlflow"], "endpoint": status["bento"]}


def _print_summary(summary: dict, out) -> None:
    print("\n== results on the built-in held-out slices ==")
    print(f"{'model':6s} {'version':>7s} {'PSNR dB':>8s} {'SSIM':>6s} {'noisy dB':>9s} {'train s':>8s}")
    for name, r in summary["models"].items():
        print(
            f"{name:6s} {r['registered_version']!s:>7s} {r['psnr']:8.2f} {r['ssim']:6.3f} "
            f"{r['noisy_psnr']:9.2f} {r['train_time_s']:8.0f}"
        )
    promotion, sweep = summary["promotion"], summary["search"]
    print(f"\npromotion after training: {promotion['reason']}")
    if sweep and sweep["promotion"]:
        print(f"promotion after the search: {sweep['promotion']['reason']}")
    print(f"champion:  models:/{promotion['name']}@champion -> version {summary['champion']}")
    uri, served = summary["tracking_uri"], summary["served"]
    print("\nwhere to look:")
    if served and not served.get("error"):
        endpoint = served["endpoint"]
        print(f"  MLflow UI:    {served['mlflow']}   (runs, metrics, figures, the registry)")
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
