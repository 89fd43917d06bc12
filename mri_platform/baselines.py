"""Honest classical baselines: tuned strengths, and the clipping bias undone.

A learned denoiser is only as impressive as what it is compared with. Two things made the old baselines a strawman
(14-15 dB at the report's noise): their strengths were guessed, and they ignored that clipped (or Rician) noise is
biased: E[clip(x + n, 0, 1)] != x, about 0.18 too bright in the background at variance 0.2. A learned model absorbs
that bias; a filter that smooths towards the *noisy mean* keeps it. So here

- every method has one strength parameter, picked on a fixed subset of the *training* split (never the slices that
  are scored), once per noise setting and data version, and cached under ``state_dir()/baselines``;
- where the noise is biased, each method is also reported "+debias": its output is mapped back through the inverse of
  f(x) = E[noisy | clean = x] (a lookup table), optionally after mapping the noisy input through it as well, whichever
  scored better on the tuning slices. The plain variant stays beside it, so the difference is visible.

BM3D is optional (non-commercial licence, `pip install 'mri-platform[baselines]'`); without it, it is reported as
skipped and the others run. Plain NumPy / scikit-image / torch: no Ray, MLflow or BentoML here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import special, stats
from skimage.filters import gaussian
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

from mri_platform.config import state_dir
from mri_platform.data import SliceSet, load_builtin
from mri_platform.metrics import psnr_per_image, score
from mri_platform.noise import NoiseConfig, corrupted

DEBIAS = "+debias"
"""Suffix of the clipping-aware variant of a method, e.g. 'total_variation+debias'."""
TUNING_SEED = 0
"""Seed of the noise on the tuning slices (evaluation uses its own seed, on other slices)."""
TUNING_SLICES = 32
"""How many evenly spaced training slices the strengths are tuned on."""
CACHE_VERSION = 1
"""Bump when the methods or the tuning change, so that old cached strengths are not reused."""
GRID_POINTS = 2049
"""Points of the clean-intensity grid on which the bias curve is tabulated and inverted."""


# ---------------------------------------------------------------------------------------------------------------
# The bias of clipped and Rician noise


def is_biased(noise: NoiseConfig) -> bool:
    """Whether E[noisy | clean = x] differs from x: clipped or Rician noise (of non-zero variance)."""
    return noise.variance > 0 and (noise.clip or noise.kind == "rician")


def _clipped_gaussian_mean(x: np.ndarray, std: float) -> np.ndarray:
    """E[clip(x + std * Z, 0, 1)] in closed form: the two clipped tails plus the mean of the truncated middle."""
    a, b = -x / std, (1.0 - x) / std
    middle = x * (special.ndtr(b) - special.ndtr(a)) + std * (stats.norm.pdf(a) - stats.norm.pdf(b))
    return middle + special.ndtr(-b)


def _rician_mean(x: np.ndarray, std: float) -> np.ndarray:
    """E[|x + std * (Z1 + i Z2)|] in closed form, std * sqrt(pi/2) * L_1/2(-x^2 / 2 std^2), with scaled Bessels."""
    half = x**2 / (4 * std**2)  # -q/2 in L_1/2(q) = exp(q/2) [(1 - q) I0(-q/2) - q I1(-q/2)]
    laguerre = (1 + 2 * half) * special.ive(0, half) + 2 * half * special.ive(1, half)
    return std * math.sqrt(math.pi / 2) * laguerre


def _clipped_rician_mean(x: np.ndarray, std: float) -> np.ndarray:
    """E[min(Y, 1)] for Rician Y, as the integral of P(Y > t) over t in [0, 1] (smooth in t, so the trapezoid
    rule on a fine grid is accurate to about 1e-6)."""
    t = np.linspace(0.0, 1.0, 513)
    survival = stats.rice.sf(t[None, :] / std, x[:, None] / std)
    return np.trapezoid(survival, t, axis=1)


@lru_cache(maxsize=16)
def bias_curve(noise: NoiseConfig) -> tuple[np.ndarray, np.ndarray]:
    """(x, f(x)) on a fine grid of clean intensities in [0, 1], where f(x) = E[noisy | clean = x].

    The identity for unclipped Gaussian noise; increasing in x for every noise here, so it can be inverted by
    interpolation. Cached per noise setting; the arrays are read-only.
    """
    x = np.linspace(0.0, 1.0, GRID_POINTS)
    if not is_biased(noise):
        f = x.copy()
    elif noise.kind == "gaussian":
        f = _clipped_gaussian_mean(x, noise.std)
    elif noise.clip:
        f = _clipped_rician_mean(x, noise.std)
    else:
        f = _rician_mean(x, noise.std)
    if not (np.all(np.diff(f) >= 0) and f[-1] > f[0]):
        raise ValueError(
            f"the bias curve of {noise.describe()} is not increasing, so the baselines cannot undo the bias; "
            "give a smaller noise variance"
        )
    x.flags.writeable = f.flags.writeable = False
    return x, f


def invert_bias(y: np.ndarray, noise: NoiseConfig) -> np.ndarray:
    """Map smoothed values y (estimates of E[noisy]) back to clean intensities: f^-1(y), clamped to [0, 1].

    Values below f(0) (darker than pure noise can be on average) become 0, values above f(1) become 1.
    """
    if not is_biased(noise):
        return np.clip(y, 0.0, 1.0)
    x, f = bias_curve(noise)
    return np.interp(y, f, x)


# ---------------------------------------------------------------------------------------------------------------
# The methods


@dataclass(frozen=True)
class Method:
    """A classical denoiser with one strength parameter and the grid it is tuned over."""

    name: str
    param: str
    """Name of the strength parameter, as reported (e.g. 'weight')."""
    grid: Callable[[float], tuple[float, ...]]
    """Candidate strengths for a noise std (absolute, or scaled by the std where the method takes a noise level)."""
    apply: Callable[[np.ndarray, float, float], np.ndarray]
    """(image, strength, noise std) -> filtered image, float64."""
    max_tuning_slices: int | None = None
    """Tune on fewer slices than TUNING_SLICES (for slow methods)."""


def _bm3d(image: np.ndarray, strength: float, std: float) -> np.ndarray:
    import bm3d

    return np.asarray(bm3d.bm3d(image, sigma_psd=strength), dtype=np.float64)


def _scaled(*factors: float) -> Callable[[float], tuple[float, ...]]:
    """A grid of multiples of the noise std, for methods whose strength is a noise level."""
    return lambda std: tuple(round(k * std, 6) for k in factors)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "gaussian_blur",
            "sigma",
            lambda std: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0),
            lambda image, sigma, std: gaussian(image, sigma=sigma),
        ),
        Method(
            "total_variation",
            "weight",
            lambda std: (0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0),
            lambda image, weight, std: denoise_tv_chambolle(image, weight=weight),
        ),
        Method(
            "nl_means",
            "h",
            _scaled(0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0),
            lambda image, h, std: denoise_nl_means(
                image, h=h, sigma=std, patch_size=5, patch_distance=6, fast_mode=True
            ),
        ),
        # 0.2-1.3 s per 64x64 image: a small grid on few slices (the strength is the assumed noise std)
        Method("bm3d", "sigma_psd", _scaled(0.6, 0.8, 1.0, 1.3), _bm3d, max_tuning_slices=16),
    )
}


def skipped_methods() -> dict[str, str]:
    """Methods that cannot run here, with the reason and what to do (BM3D is an optional install)."""
    try:
        import bm3d  # noqa: F401
    except ImportError as exc:
        return {
            "bm3d": f"bm3d is not importable ({exc}); it is optional because of its non-commercial licence: "
            "pip install 'mri-platform[baselines]' (or bm3d==4.0.3) to include it"
        }
    return {}


def _methods(names: Sequence[str] | None) -> list[Method]:
    """The named methods (default: all) that can run here; unknown names are an error."""
    names = list(METHODS) if names is None else list(names)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown baseline method(s) {unknown}; choose from {', '.join(METHODS)}")
    skipped = skipped_methods()
    return [METHODS[n] for n in names if n not in skipped]


def _check_noise(noise: NoiseConfig) -> None:
    if noise.variance <= 0:
        raise ValueError("baselines need noise to remove: give a noise variance (or std) above 0")


def _filtered(method: Method, noisy: np.ndarray, strength: float, noise: NoiseConfig, invert_input: bool):
    """The method on one noisy image, or on the image with the bias inverted pixel by pixel first."""
    return method.apply(invert_bias(noisy, noise) if invert_input else noisy, strength, noise.std)


def _finish(output: np.ndarray, noise: NoiseConfig, debias: bool) -> np.ndarray:
    """A filter's output as an image in [0, 1]: clipped (plain), or mapped through the inverse bias (debias)."""
    return invert_bias(output, noise) if debias else np.clip(output, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Tuning on the training split


def _pairs(slices: SliceSet, noise: NoiseConfig, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(clean, noisy) 2D float64 images, the noisy ones exactly the fixed-seed corruption a model is scored on
    (`noise.corrupted`, drawn per slice shape), so any size or mix of sizes works."""
    pairs = []
    for clean, noisy in corrupted(slices, noise, seed):
        pairs += [(c[0].double().numpy(), n[0].double().numpy()) for c, n in zip(clean, noisy, strict=True)]
    return pairs


def _batch(image: np.ndarray) -> torch.Tensor:
    """A 2D image as the (1, 1, H, W) float32 batch the metrics take."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32))[None, None]


def _psnr(restored: np.ndarray, clean: np.ndarray) -> float:
    return psnr_per_image(_batch(restored), _batch(clean)).item()


def _tuning_subset(train: SliceSet, count: int) -> SliceSet:
    """`count` evenly spaced training slices (every plane and depth of the volumes is represented)."""
    return train.subset(np.unique(np.linspace(0, len(train) - 1, min(count, len(train))).round().astype(int)))


def _mean_psnr(restored: list[np.ndarray], clean: list[np.ndarray]) -> float:
    return float(np.mean([_psnr(r, c) for r, c in zip(restored, clean, strict=True)]))


def _tune_method(method: Method, pairs: list[tuple[np.ndarray, np.ndarray]], noise: NoiseConfig) -> dict[str, dict]:
    """Best strength (by mean PSNR) of the plain variant and, for biased noise, of the debias variant together
    with whether inverting the input as well helps. One filter run serves the plain and the output-only variant."""
    clean, noisy = [c for c, _ in pairs], [n for _, n in pairs]
    biased = is_biased(noise)
    means: dict[tuple[bool | None, float], float] = {}  # (None: plain, else invert_first, strength) -> PSNR
    for strength in method.grid(noise.std):
        outputs = [_filtered(method, image, strength, noise, False) for image in noisy]
        means[None, strength] = _mean_psnr([_finish(o, noise, False) for o in outputs], clean)
        if biased:
            means[False, strength] = _mean_psnr([_finish(o, noise, True) for o in outputs], clean)
            twice = [_finish(_filtered(method, image, strength, noise, True), noise, True) for image in noisy]
            means[True, strength] = _mean_psnr(twice, clean)
    return _best(method, means, biased)


def _best(method: Method, means: dict[tuple[bool | None, float], float], biased: bool) -> dict[str, dict]:
    """{variant name: {"params": ..., "tuning_psnr": ...}} from mean PSNRs keyed by (invert_first, strength)."""
    plain = ((k, v) for k, v in means.items() if k[0] is None)
    (_, strength), psnr = max(plain, key=lambda kv: kv[1])
    chosen = {method.name: {"params": {method.param: strength}, "tuning_psnr": psnr}}
    if biased:
        debiased = ((k, v) for k, v in means.items() if k[0] is not None)
        (invert_first, strength), psnr = max(debiased, key=lambda kv: kv[1])
        params = {method.param: strength, "invert_first": invert_first}
        chosen[method.name + DEBIAS] = {"params": params, "tuning_psnr": psnr}
    return chosen


def _cache_path(train: SliceSet, noise: NoiseConfig, seed: int) -> Path:
    """The cache file for this noise, training data, image size, seed and every method's grid."""
    key = {
        "version": CACHE_VERSION,
        "noise": noise.to_dict(),
        "data": train.fingerprint(),
        "size": train.size,
        "seed": seed,
        "slices": TUNING_SLICES,
        "grids": {m.name: [m.param, m.grid(noise.std), m.max_tuning_slices] for m in METHODS.values()},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return state_dir() / "baselines" / f"{digest}.json"


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached tuning, or an empty one when there is none (or it is unreadable: it is then tuned again)."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) and isinstance(cached.get("tuned"), dict) else {}


def _write_cache(path: Path, content: dict[str, Any]) -> None:
    """Write atomically, so that a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(content, tmp, indent=2)
    os.replace(tmp.name, path)


def tune_baselines(
    train_slices: SliceSet, noise: NoiseConfig, seed: int = TUNING_SEED, methods: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """{variant: {"params": {...}, "tuning_psnr": dB}} for the methods (default: all that can run here).

    Tuned on a fixed subset of `train_slices` with fixed-seed noise, so the scored slices never choose a strength;
    cached per noise, data fingerprint, image size and grid, so it is tuned once (a method installed later, such as
    bm3d, is tuned then and added to the same file).
    """
    _check_noise(noise)
    path = _cache_path(train_slices, noise, seed)
    cached = _read_cache(path)
    tuned: dict[str, dict[str, Any]] = dict(cached.get("tuned", {}))
    missing = [m for m in _methods(methods) if m.name not in tuned]
    if missing:
        tuned |= _tune_and_say(missing, train_slices, noise, seed, path)
        _write_cache(path, _cache_content(train_slices, noise, seed, tuned))
    wanted = {m.name for m in _methods(methods)}
    return {name: entry for name, entry in tuned.items() if name.removesuffix(DEBIAS) in wanted}


def _tune_and_say(
    methods: list[Method], train: SliceSet, noise: NoiseConfig, seed: int, path: Path
) -> dict[str, dict[str, Any]]:
    """Tune `methods`, saying so on one terminal line (stderr) with the time it took."""
    names = ", ".join(m.name for m in methods)
    message = f"tuning baselines ({names}) on training slices at {noise.describe()} ..."
    print(message, end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tuned = {}
    for method in methods:
        method_start = time.perf_counter()
        pairs = _pairs(
            _tuning_subset(train, min(TUNING_SLICES, method.max_tuning_slices or TUNING_SLICES)), noise, seed
        )
        for entry in (found := _tune_method(method, pairs, noise)).values():
            entry |= {"tuning_slices": len(pairs), "tuning_s": round(time.perf_counter() - method_start, 2)}
        tuned |= found
    print(f" {time.perf_counter() - start:.0f} s; cached in {path}", file=sys.stderr, flush=True)
    return tuned


def _cache_content(train: SliceSet, noise: NoiseConfig, seed: int, tuned: dict) -> dict[str, Any]:
    """What the cache file holds: the tuned strengths and, for a reader, what they were tuned on."""
    return {
        "noise": noise.describe(),
        "data": {"source": train.source, "fingerprint": train.fingerprint(), "n_slices": len(train)},
        "seed": seed,
        "tuned": tuned,
    }


# ---------------------------------------------------------------------------------------------------------------
# Scoring on the evaluation slices


def _score_images(restored: list[np.ndarray], clean: list[np.ndarray]) -> dict[str, float]:
    """metrics.score over images of any sizes, batched by shape (one SSIM convolution per shape, not per image)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(clean):
        by_shape.setdefault(image.shape, []).append(i)

    def batches(images: list[np.ndarray]) -> list[torch.Tensor]:
        stacks = (np.stack([images[i] for i in index]) for index in by_shape.values())
        return [torch.from_numpy(stack.astype(np.float32)).unsqueeze(1) for stack in stacks]

    return score(batches(restored), batches(clean))


def baseline_scores(
    slices: SliceSet,
    noise: NoiseConfig,
    seed: int,
    tune_on: SliceSet | None = None,
    methods: Sequence[str] | None = None,
    variants: str = "all",
) -> dict[str, Any]:
    """{"baselines": {variant: scores}, "best_baseline": variant} on exactly the fixed-seed noisy images a model is
    scored on. Scores are {"psnr", "ssim", "mse", "psnr_pooled", "params", "method", "debias"}, or {"skipped": why}
    for a method that cannot run here (bm3d not installed). Strengths are tuned on `tune_on` (default: the built-in
    training split at the slices' size). `variants="best"` scores only each method's variant that did better on
    the tuning slices (half the time: BM3D takes about a second per slice), "all" the plain one beside it."""
    _check_noise(noise)
    if variants not in ("all", "best"):
        raise ValueError(f"variants must be 'all' or 'best', got {variants!r}")
    tuned = tune_baselines(load_builtin(slices.size)[0] if tune_on is None else tune_on, noise, methods=methods)
    if variants == "best":
        best: dict[str, str] = {}
        for name, entry in tuned.items():
            method = name.removesuffix(DEBIAS)
            if method not in best or entry["tuning_psnr"] > tuned[best[method]]["tuning_psnr"]:
                best[method] = name
        tuned = {name: tuned[name] for name in best.values()}
    pairs = _pairs(slices, noise, seed)
    clean, noisy = [c for c, _ in pairs], [n for _, n in pairs]
    results: dict[str, dict[str, Any]] = {}
    last_run, outputs = None, []
    for name, entry in tuned.items():
        method, params, debias = METHODS[name.removesuffix(DEBIAS)], entry["params"], name.endswith(DEBIAS)
        run = (method.name, params[method.param], bool(params.get("invert_first")))
        if run != last_run:  # a method's plain and debias variants often share one filter run (bm3d is slow)
            outputs = [_filtered(method, image, run[1], noise, run[2]) for image in noisy]
            last_run = run
        restored = [_finish(output, noise, debias) for output in outputs]
        results[name] = {**_score_images(restored, clean), "params": params, "method": method.name, "debias": debias}
    wanted = METHODS if methods is None else methods
    results |= {name: {"skipped": why} for name, why in skipped_methods().items() if name in wanted}
    return {"baselines": results, "best_baseline": best_baseline(results)}


def describe_params(params: dict[str, Any] | None) -> str:
    """A method's tuned parameters for a table: 'weight=0.4, invert_first=True'."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (params or {}).items())


def best_baseline(results: dict[str, dict[str, Any]]) -> str | None:
    """The variant with the highest mean PSNR, skipped methods aside (None when none was scored)."""
    scored = [name for name, entry in results.items() if "psnr" in entry]
    return max(scored, key=lambda name: results[name]["psnr"], default=None)


__all__ = [
    "METHODS",
    "baseline_scores",
    "best_baseline",
    "bias_curve",
    "describe_params",
    "invert_bias",
    "is_biased",
    "skipped_methods",
    "tune_baselines",
]
