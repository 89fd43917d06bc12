"""ASHA against running every trial to the end, on the same seeded search: trial-epochs spent and best PSNR.

Both sweeps draw the same configurations (random search, fixed seed) on the built-in data, one worker per trial and
two trials at once. Also reports trials per hour and Tune-over-Train's overhead per trial (time to the first epoch's
report, which includes starting the trial's Ray Train worker group, against an epoch's own time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from tuning.search import SearchConfig, run_search


def sweep(scheduler: str, samples: int, folder: str) -> dict:
    search = SearchConfig(
        filters=[16, 32, 64], epochs=(8, 8), lr=(3e-4, 4e-3), samples=samples, workers_per_trial=1,
        max_concurrent=2, scheduler=scheduler, grace_period=2, reduction_factor=2, search="random", seed=7,
    )  # fmt: skip
    overrides = {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "storage": f"{folder}/ckpt"}
    return run_search(search, overrides, name=f"bench-{scheduler}", registered_model="bench-tune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MRI_PLATFORM_HOME"] = folder
        for scheduler in ("fifo", "asha"):
            summary = sweep(scheduler, args.samples, folder)
            epochs = sum(t["epochs_run"] for t in summary["trials"])
            first = [t["first_epoch_s"] for t in summary["trials"] if t.get("first_epoch_s")]
            later = [t["epoch_s"] for t in summary["trials"] if t.get("epoch_s")]
            rows[scheduler] = (summary, epochs, statistics.median(first), statistics.median(later))
            print(f"{scheduler}: {epochs} trial-epochs, best {summary['best_psnr']:.2f} dB", flush=True)
    import ray

    ray.shutdown()
    print(f"\n{'scheduler':9s} {'trials':>6s} {'stopped':>7s} {'trial-epochs':>12s} {'best PSNR':>9s} "
          f"{'wall s':>7s} {'trials/h':>8s} {'1st epoch s':>11s} {'epoch s':>7s}")  # fmt: skip
    for name, (summary, epochs, first, later) in rows.items():
        per_hour = summary["n_trials"] / summary["elapsed_s"] * 3600
        print(
            f"{name:9s} {summary['n_trials']:6d} {summary['n_stopped_early']:7d} {epochs:12d} "
            f"{summary['best_psnr']:9.2f} {summary['elapsed_s']:7.0f} {per_hour:8.0f} {first:11.1f} {later:7.1f}"
        )
    (fifo, fifo_epochs, *_), (asha, asha_epochs, *_) = rows["fifo"], rows["asha"]
    print(
        f"\nASHA spent {asha_epochs / fifo_epochs:.0%} of the trial-epochs of running every trial to the end; "
        f"best PSNR {asha['best_psnr'] - fifo['best_psnr']:+.2f} dB against it"
    )


if __name__ == "__main__":
    main()
