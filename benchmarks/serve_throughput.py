"""Serving throughput: a real `bentoml serve` of AE1 and AE2 under closed-loop load: the service's batcher against
BentoML's adaptive dispatcher and against no batching, JSON vs .npy bodies.

Each model is registered in a temporary sqlite MLflow registry, imported into a temporary BentoML store the way
`mri-platform build` does it, and served (one server at a time) per --modes: MRI_SERVICE_BATCHING=on (the
service's greedy batcher, service/batcher.py) with JSON bodies, `bentoml` (BentoML's CORK dispatcher) with JSON,
`off` with JSON, and `on` and `off` with .npy bodies (application/x-npy, service/binary.py; modes `npy` and
`npy-off`). A closed loop of 1, 8, 32 and 64 clients (threads with keep-alive connections) posts one 64x64 slice
per request to /denoise; each level warms up, then runs until --requests answers or --seconds, whichever comes
first. The batch sizes that formed come from the server's Prometheus histograms (before/after each level). With no
server running, the same `Denoiser` the service runs, at the same precision, is then timed in this process at those
batch sizes, one pass at a time on every core and a pass per core at once (the service's default): the better of
the two is the ceiling.

The load generator runs on the same cores as the server (2 on this machine kind): its CPU use is printed beside
the server's so that a client-bound result is visible. Untrained weights: throughput does not depend on them.
Run inside a loopback-only namespace: `scripts/isolated .venv/bin/python benchmarks/serve_throughput.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import re
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from mri_platform import supervisor
from mri_platform.servers import start_bento

ROOT = Path(__file__).resolve().parent.parent
"""Where `bentoml serve` runs, so that it imports the service from this checkout."""
TARGET = "service.service:MRIDenoiser"
BATCH_METRICS = ("mri_denoise_batch_size", "bentoml_service_adaptive_batch_size")
"""The histograms of requests merged per forward call: the service's batcher's and BentoML's dispatcher's (observed
once per batch; here 1 request = 1 slice). A server fills one of them, by its MRI_SERVICE_BATCHING."""
REGISTERED = "mri-denoiser"
NPY = "application/x-npy"
"""/denoise's binary transport (service/binary.py)."""
OTHER_CPU_WARNING = 0.2
"""Cores used by other processes during a level above which the report warns that the figures are distorted."""
PRECISION = os.environ.get("MRI_SERVICE_PRECISION", "auto")
"""The servers' precision (the service's default, 'auto', unless set), and the in-process ceiling's."""
TIMEOUT_S = 30.0
"""A request that takes longer counts as an error; bounds the drain at the end of a level."""


@dataclass
class Level:
    """One concurrency level against one server."""

    model: str
    batching: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    """Answers with status 200 per second (one slice each)."""
    p50_ms: float
    """Latency percentiles of the 200 answers."""
    p99_ms: float
    mean_batch: float | None
    """Requests per forward pass from the server's histogram; None with batching off (every request alone)."""
    client_cpu: float
    """Cores the load generator (this process) used on average."""
    server_cpu: float
    """Cores the server's process tree used on average."""
    other_cpu: float
    """Cores everything else on the machine used meanwhile: other people's jobs distort the figures."""
    statuses: dict[str, int] = field(default_factory=dict)
    """Errors by status (0: no answer within the timeout, or the connection failed)."""
    ceiling_batch: int = 1
    """The batch size the ceiling is taken at: the mean batch, rounded."""
    ceiling_ips: float = 0.0
    """In-process slices/s of the model at that batch size."""
    best_ips: float = 0.0
    """In-process slices/s at the best batch size measured: on this CPU, passes of 8 slices ran up to 2x faster per
    slice than those of 16 or 32, so the batch that formed can understate what the model does here."""
    best_batch: int = 1


@dataclass
class Server:
    """One `bentoml serve` (one worker): how long it took to answer /readyz, and its memory after the load."""

    model: str
    batching: str
    ready_s: float
    rss_mb: float
    pss_mb: float
    processes: int


# ------------------------------------------------------------------------------------------------- models


def prepare_models(names: list[str], folder: Path) -> dict[str, tuple[str, Path]]:
    """Register each model in a sqlite registry and import it into BentoML's store; name -> (tag, checkpoint).

    Both go under one registered name so that their versions (and so BentoML tags v1, v2) differ.
    """
    import torch

    from mri_platform import tracking
    from mri_platform.checkpoints import save_checkpoint
    from mri_platform.config import build_config
    from mri_platform.models import ModelConfig, build_model
    from mri_platform.noise import NoiseConfig
    from service.build import import_model

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    prepared = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(ModelConfig.named(name)).eval()
        (folder / name).mkdir()
        checkpoint = save_checkpoint(
            folder / name / "checkpoint.pt",
            model,
            noise=NoiseConfig().to_dict(),
            data={"size": 64, "source": "benchmark"},
            epoch=0,
        )
        config = build_config(None, model=name, tracking_uri=uri, registered_model=REGISTERED)
        run_id = tracking.client(uri).create_run(tracking.experiment_id(uri, config.experiment)).info.run_id
        _, version = tracking.log_model(uri, run_id, model, checkpoint, {"psnr": 0.0, "ssim": 0.0}, config)
        prepared[name] = (import_model(f"models:/{REGISTERED}/{version}", uri)["tag"], checkpoint)
    return prepared


# ------------------------------------------------------------------------------------------------- server


@contextlib.contextmanager
def serve(tag: str, batching: str, state: Path, home: Path) -> Iterator[tuple[supervisor.Service, float]]:
    """A `bentoml serve` of the service with this model; yields it and its ready time; always stopped."""
    started = time.perf_counter()
    env = {"MRI_SERVICE_MODEL": tag, "MRI_SERVICE_BATCHING": batching}
    server = start_bento(state, TARGET, bentoml_home=home, env=env, cwd=ROOT)
    ready = time.perf_counter() - started  # start_bento polls /readyz every 0.25 s
    try:
        yield server, ready
    finally:
        supervisor.stop(server)


@contextlib.contextmanager
def served_model(model: str, prefix: str) -> Iterator[tuple[supervisor.Service, float]]:
    """Untrained weights of `model` registered, imported and served with batching on, all in a temporary folder
    (MRI_PLATFORM_HOME and BENTOML_HOME point there); yields the server and its ready time."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = Path(tmp)
        os.environ["MRI_PLATFORM_HOME"] = str(folder / "state")
        os.environ["BENTOML_HOME"] = str(folder / "bentoml")  # read by BentoML when first imported (import_model)
        os.environ["BENTOML_DO_NOT_TRACK"] = "true"
        tag, _ = prepare_models([model], folder)[model]
        with serve(tag, "on", folder / "serve", folder / "bentoml") as served:
            yield served


def tree_cpu(server: supervisor.Service) -> float:
    """CPU seconds (user + system) used so far by the server's live processes."""
    total = 0.0
    for proc in supervisor.members(server):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def busy_cpu() -> float:
    """CPU seconds the machine's processes have spent running (user + system, nice included).

    Interrupt time is left out: the loopback traffic of the benchmark itself is accounted there.
    """
    times = psutil.cpu_times()
    return times.user + times.nice + times.system


def tree_memory(server: supervisor.Service) -> tuple[float, float, int]:
    """(RSS, PSS) in MB summed over the server's processes, and their number. RSS counts the pages the processes
    share (torch's libraries, mapped by both the `bentoml serve` parent and its worker) once per process; PSS
    splits them between the processes, so it is the fairer total."""
    rss = pss = 0
    procs = supervisor.members(server)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
    return rss / 2**20, pss / 2**20, len(procs)


def batch_histogram(url: str) -> tuple[float, float]:
    """(sum, count) of the batch size histograms for /denoise, summed over workers."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"sum": 0.0, "count": 0.0}
    names = "|".join(BATCH_METRICS)
    pattern = re.compile(rf"^(?:{names})_(sum|count)(?:\{{([^}}]*)\}})? ([0-9.eE+-]+)$", re.MULTILINE)
    for kind, labels, value in pattern.findall(text):
        if not labels or 'method_name="denoise"' in labels:
            totals[kind] += float(value)
    return totals["sum"], totals["count"]


# ------------------------------------------------------------------------------------------------- load


class _Budget:
    """Hands out at most `limit` request slots until `deadline`: the level's two bounds in one place."""

    def __init__(self, limit: int, seconds: float):
        self.left, self.deadline, self.lock = limit, time.perf_counter() + seconds, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0 or time.perf_counter() >= self.deadline:
                return False
            self.left -= 1
            return True


def post(conn: http.client.HTTPConnection, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """One POST on a keep-alive connection: (status, answer), or (0, b"") when it was refused, reset or timed out,
    in which case ``conn`` is closed and reconnects on its next request. The answer is not decoded: a load
    generator's CPU should go to sending load."""
    try:
        conn.request("POST", path, body, {"Content-Type": content_type, "Connection": "keep-alive"})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        conn.close()
        return 0, b""


def _client(
    host: str, port: int, body: bytes, budget: _Budget, out: list[tuple[float, int]], content_type: str
) -> None:
    """One closed-loop client: a keep-alive connection, the next request as soon as the answer is read."""
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    while budget.take():
        started = time.perf_counter()
        status, _ = post(conn, "/denoise", body, content_type)
        out.append((time.perf_counter() - started, status))
    conn.close()


def drive(
    url: str, body: bytes, concurrency: int, seconds: float, requests: int, content_type: str = "application/json"
) -> tuple[list, float, float]:
    """Run `concurrency` closed-loop clients; returns ([(latency s, status)], wall s, this process's CPU s)."""
    host, port = url.removeprefix("http://").split(":")
    budget = _Budget(requests, seconds)
    results: list[list[tuple[float, int]]] = [[] for _ in range(concurrency)]
    threads = [
        threading.Thread(target=_client, args=(host, int(port), body, budget, results[i], content_type), daemon=True)
        for i in range(concurrency)
    ]
    cpu, started = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + TIMEOUT_S + 5)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return [r for per_client in results for r in per_client], wall, cpu


def check_answer(url: str, body: bytes, content_type: str = "application/json") -> None:
    """One request decoded in full: the load itself only counts status codes."""
    request = urllib.request.Request(f"{url}/denoise", body, {"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        content = response.read()
    if content_type == NPY:
        shape = np.load(io.BytesIO(content), allow_pickle=False).shape
    else:
        shape = np.asarray(json.loads(content), dtype=np.float32).shape
    if shape != (1, 64, 64):
        raise RuntimeError(f"/denoise answered shape {shape}, expected (1, 64, 64)")


def run_level(
    server: supervisor.Service,
    model: str,
    batching: str,
    body: bytes,
    concurrency: int,
    args: argparse.Namespace,
    content_type: str = "application/json",
) -> Level:
    """Warm up (unmeasured: first passes, connections, and in `bentoml` mode its dispatcher's latency model), then
    measure."""
    drive(server.url, body, concurrency, args.warmup, 10**9, content_type)
    before, server_cpu, busy = batch_histogram(server.url), tree_cpu(server), busy_cpu()
    results, wall, client_cpu = drive(server.url, body, concurrency, args.seconds, args.requests, content_type)
    server_cpu, busy = tree_cpu(server) - server_cpu, busy_cpu() - busy
    after = batch_histogram(server.url)
    ok = np.array([latency for latency, status in results if status == 200]) * 1000
    batches = after[1] - before[1]
    return Level(
        model=model,
        batching=batching,
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        seconds=wall,
        rps=len(ok) / wall,
        p50_ms=float(np.percentile(ok, 50)) if len(ok) else float("nan"),
        p99_ms=float(np.percentile(ok, 99)) if len(ok) else float("nan"),
        mean_batch=(after[0] - before[0]) / batches if batches else None,
        client_cpu=client_cpu / wall,
        server_cpu=server_cpu / wall,
        other_cpu=max(0.0, busy - client_cpu - server_cpu) / wall,
        statuses={str(k): v for k, v in Counter(status for _, status in results).items() if k != 200},
    )


# ------------------------------------------------------------------------------------------------- ceiling


ROUNDS = 5


def in_process(
    checkpoint: Path, batch_sizes: list[int], seconds: float
) -> tuple[dict[int, float], dict[int, dict[int, float]]]:
    """Slices/s of the service's own `Denoiser` at each batch size, in this process with no server running, with the
    service's malloc settings: the best of two ways to use the cores, and each way's figures (by passes at once).

    - one pass at a time on every core's threads (MRI_SERVICE_PASSES=1), one caller;
    - the service's default, a pass per core of one thread each (`default_passes`), fed by as many callers at once
      (its batcher runs that many calls at once).

    The best of several short rounds, taken in turn over the batch sizes, so that a burst of other work on the
    machine lowers one round rather than one batch size's figure.
    """
    from service.admission import return_freed_memory
    from service.denoiser import Denoiser, configure_threads, default_passes

    return_freed_memory()
    rng = np.random.default_rng(0)
    batches = {size: rng.random((size, 64, 64), dtype=np.float32) for size in batch_sizes}
    by_passes: dict[int, dict[int, float]] = {}
    for passes in sorted({1, default_passes("cpu")}):
        configure_threads(passes=passes)  # the callers below are new threads: they take this count
        denoiser = Denoiser(checkpoint, precision=PRECISION, passes=passes)
        speeds = by_passes[passes] = dict.fromkeys(batch_sizes, 0.0)
        for batch in batches.values():
            denoiser(batch)
        for _ in range(ROUNDS):
            for size, batch in batches.items():
                done, started = _callers(denoiser, batch, passes, seconds / ROUNDS)
                speeds[size] = max(speeds[size], size * done / (time.perf_counter() - started))
    configure_threads()
    best = {size: max(speeds[size] for speeds in by_passes.values()) for size in batch_sizes}
    return best, by_passes


def _callers(denoiser: Any, batch: np.ndarray, callers: int, seconds: float) -> tuple[int, float]:
    """(calls done, start time) of `callers` threads calling ``denoiser(batch)`` for `seconds` (at least 2 each)."""
    counts, started = [0] * callers, time.perf_counter()

    def call(index: int) -> None:
        while counts[index] < 2 or time.perf_counter() - started < seconds:
            denoiser(batch)
            counts[index] += 1

    threads = [threading.Thread(target=call, args=(index,)) for index in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts), started


# ------------------------------------------------------------------------------------------------- report


def print_tables(levels: list[Level], servers: list[Server]) -> None:
    header = (
        "| model | concurrency | mode | req/s | p50 ms | p99 ms | errors | mean batch "
        "| in-process img/s at that batch | served/ceiling % | client CPU | server CPU | other CPU |"
    )
    for model in dict.fromkeys(level.model for level in levels):
        rows = sorted((lv for lv in levels if lv.model == model), key=lambda lv: (lv.concurrency, lv.batching))
        print(f"\n### {model.upper()}\n\n{header}\n|{'---|' * header.count('|', 1)}")
        for lv in rows:
            batch = f"{lv.mean_batch:.1f}" if lv.mean_batch is not None else "1 (off)"
            errors = f"{lv.errors}" + (f" {lv.statuses}" if lv.statuses else "")
            share = 100 * lv.rps / lv.ceiling_ips
            print(
                f"| {model} | {lv.concurrency} | {lv.batching} | {lv.rps:.0f} | {lv.p50_ms:.1f} | {lv.p99_ms:.1f} "
                f"| {errors} | {batch} | {lv.ceiling_ips:.0f} (b={lv.ceiling_batch}) | {share:.0f} "
                f"| {lv.client_cpu:.2f} | {lv.server_cpu:.2f} | {lv.other_cpu:.2f} |"
            )
        by = {(lv.concurrency, lv.batching): lv for lv in rows}
        summary = []
        if (32, "on") in by and (32, "off") in by:
            on, off = by[(32, "on")], by[(32, "off")]
            summary.append(f"batching speed-up at concurrency 32: {on.rps / off.rps:.2f}x")
            summary.append(f"p99 at concurrency 32 (on): {on.p99_ms:.0f} ms")
        for concurrency in (32, 64):
            if (concurrency, "on") in by and (concurrency, "bentoml") in by:
                ours, theirs = by[(concurrency, "on")], by[(concurrency, "bentoml")]
                summary.append(
                    f"service's batcher against BentoML's dispatcher at concurrency {concurrency}: "
                    f"{ours.rps / theirs.rps:.2f}x (p99 {ours.p99_ms:.0f} against {theirs.p99_ms:.0f} ms)"
                )
        if (64, "on") in by:
            top = by[(64, "on")]
            summary.append(f"served/ceiling at concurrency 64 (on): {100 * top.rps / top.ceiling_ips:.0f} %")
        if (64, "npy") in by:
            top = by[(64, "npy")]
            summary.append(f"served/ceiling at concurrency 64 (npy): {100 * top.rps / top.ceiling_ips:.0f} %")
            summary.append(
                f"served/best in-process rate at concurrency 64 (npy): {100 * top.rps / top.best_ips:.0f} % "
                f"({top.best_ips:.0f} slices/s at b={top.best_batch})"
            )
            if (64, "on") in by:
                summary.append(f".npy against JSON at concurrency 64: {top.rps / by[(64, 'on')].rps:.2f}x")
        if (32, "npy") in by and (32, "npy-off") in by:
            npy, off = by[(32, "npy")], by[(32, "npy-off")]
            summary.append(
                f"batching speed-up with .npy at concurrency 32: {npy.rps / off.rps:.2f}x, p99 {npy.p99_ms:.0f} ms"
            )
        if (32, "npy") in by and (32, "off") in by:
            npy, off = by[(32, "npy")], by[(32, "off")]
            summary.append(
                f"batched .npy against unbatched JSON at 32: {npy.rps / off.rps:.2f}x, p99 {npy.p99_ms:.0f} ms"
            )
        if summary:
            print(f"\n{model.upper()}: " + "; ".join(summary))
    print("\n| model | batching | ready s | RSS MB (tree) | PSS MB (tree) | processes |\n|---|---|---|---|---|---|")
    for s in servers:
        print(f"| {s.model} | {s.batching} | {s.ready_s:.1f} | {s.rss_mb:.0f} | {s.pss_mb:.0f} | {s.processes} |")


def measure_model(
    name: str, tag: str, checkpoint: Path, bodies: dict[str, bytes], folder: Path, args: argparse.Namespace
) -> tuple[list[Level], list[Server], dict[int, float]]:
    """Every level against a server per mode (the service's batcher, BentoML's dispatcher, or none, with JSON; the
    service's batcher with .npy bodies); then the in-process ceiling, with no server up."""
    levels, servers = [], []
    for mode in args.modes:
        batching = {"npy": "on", "npy-off": "off"}.get(mode, mode)
        content_type = NPY if mode.startswith("npy") else "application/json"
        body = bodies[content_type]
        with serve(tag, batching, folder / f"serve-{name}-{mode}", folder / "bentoml") as (server, ready):
            check_answer(server.url, body, content_type)
            for concurrency in args.concurrency:
                level = run_level(server, name, mode, body, concurrency, args, content_type)
                levels.append(level)
                batch = f"{level.mean_batch:.1f}" if level.mean_batch is not None else "-"
                print(
                    f"{name} mode={mode} c={concurrency}: {level.rps:.0f} req/s, p99 {level.p99_ms:.0f} ms, "
                    f"{level.errors} errors, mean batch {batch}, other CPU {level.other_cpu:.2f}",
                    flush=True,
                )
            servers.append(Server(name, mode, ready, *tree_memory(server)))
    for level in levels:
        level.ceiling_batch = max(1, round(level.mean_batch)) if level.mean_batch is not None else 1
    sizes = sorted({1, 8, 32, 64, *(level.ceiling_batch for level in levels)})
    busy, own, started = busy_cpu(), time.process_time(), time.perf_counter()
    speeds, by_passes = in_process(checkpoint, sizes, args.ceiling_seconds)
    wall = time.perf_counter() - started
    other = max(0.0, busy_cpu() - busy - (time.process_time() - own)) / wall
    for passes, each in by_passes.items():
        speeds_text = ", ".join(f"b={b}: {v:.0f}" for b, v in each.items())
        print(f"{name} in-process img/s, {passes} pass(es) at once: {speeds_text} (other CPU {other:.2f})", flush=True)
    best = max(speeds, key=speeds.__getitem__)
    for level in levels:
        level.ceiling_ips = speeds[level.ceiling_batch]
        level.best_ips, level.best_batch = speeds[best], best
    return levels, servers, speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ae1,ae2", type=lambda v: [m.strip() for m in v.split(",")])
    parser.add_argument("--concurrency", default="1,8,32,64", type=lambda v: [int(c) for c in v.split(",")])
    parser.add_argument("--seconds", type=float, default=6.0, help="time cap of each measured level")
    parser.add_argument("--requests", type=int, default=5000, help="request cap of each measured level")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each level, not measured")
    parser.add_argument(
        "--ceiling-seconds", type=float, default=2.5, help="time per in-process batch size (best of 5 rounds)"
    )
    parser.add_argument(
        "--modes",
        default="on,bentoml,off,npy,npy-off",
        type=lambda v: [m.strip() for m in v.split(",")],
        help="servers to measure: 'on' (the service's batcher, JSON), 'bentoml' (BentoML's dispatcher, JSON), 'off' "
        "(no batching, JSON), 'npy' (the service's batcher, .npy bodies), 'npy-off' (no batching, .npy bodies)",
    )
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    began = time.perf_counter()
    slice_ = np.random.default_rng(0).random((1, 64, 64), dtype=np.float32)
    body = json.dumps({"slices": np.round(slice_, 4).tolist()}).encode()  # one slice per request, sent every time
    buffer = io.BytesIO()
    np.save(buffer, slice_, allow_pickle=False)
    bodies = {"application/json": body, NPY: buffer.getvalue()}

    levels: list[Level] = []
    servers: list[Server] = []
    ceilings: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        folder = Path(tmp)
        os.environ["MRI_PLATFORM_HOME"] = str(folder / "state")
        os.environ["BENTOML_HOME"] = str(folder / "bentoml")  # read by BentoML when first imported (import_model)
        os.environ["BENTOML_DO_NOT_TRACK"] = "true"
        prepared = prepare_models(args.models, folder)
        for name, (tag, checkpoint) in prepared.items():
            model_levels, model_servers, ceilings[name] = measure_model(name, tag, checkpoint, bodies, folder, args)
            levels += model_levels
            servers += model_servers

    print_tables(levels, servers)
    busiest = max((level.other_cpu for level in levels), default=0.0)
    if busiest > OTHER_CPU_WARNING:
        print(
            f"\nWARNING: other processes used up to {busiest:.2f} of the {psutil.cpu_count()} cores during the "
            "levels (column 'other CPU'): the figures are lower and noisier than on a quiet machine."
        )
    print(
        f"\nmachine: {psutil.cpu_count()} cores ({cpu_model()}); the servers ran {passes_line()}; the ceiling is "
        f"the better of that and one pass at a time on every core; precision {PRECISION}; the load generator shares "
        "those cores with the "
        "server (client / server / other CPU in cores). One slice per request; mean batch = requests merged per "
        f"forward pass (the servers' batch size histograms). Whole run: {time.perf_counter() - began:.0f} s."
    )
    if args.json:
        report = {
            "levels": [asdict(level) for level in levels],
            "servers": [asdict(server) for server in servers],
            "in_process_img_per_s": ceilings,
            "cores": psutil.cpu_count(),
        }
        args.json.write_text(json.dumps(report, indent=2))


def cpu_model() -> str:
    """The vector units torch uses here and whether the CPU computes bf16 natively ('auto' precision's rule)."""
    import torch

    from mri_platform.steps import autocast_dtype

    native = autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16
    return f"{torch.backends.cpu.get_cpu_capability()}, {'native' if native else 'no native'} bf16"


def passes_line() -> str:
    """How the servers used the cores: forward passes at once, threads each (MRI_SERVICE_PASSES unless 0)."""
    from service.denoiser import default_passes, usable_cores

    passes = int(os.environ.get("MRI_SERVICE_PASSES") or 0) or default_passes("cpu")
    return f"{passes} forward pass(es) at once of {max(1, usable_cores() // passes)} thread(s) each"


if __name__ == "__main__":
    main()
