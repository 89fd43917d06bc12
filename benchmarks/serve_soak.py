"""Serving soak: a real `bentoml serve` under mixed traffic for minutes; errors and memory over time.

--concurrency closed-loop clients (default 64) each pick the next request from a fixed mix, for --minutes (default
10), bounded in requests too:
- /denoise with one 64 x 64 slice (most requests; as JSON and as .npy, whose requests the service answers before
  BentoML's router: service.binary.Direct), and with four 128 x 128 slices;
- /denoise_image with dipy's real T1 coronal slice as PNG (256 x 256);
- /preview of that PNG with the model's noise added;
- /denoise_volume with nibabel's real example4d EPI volume (128 x 96 x 24 x 2, gzip).
Every answer that is not 200 counts as an error, 503 included (the mix stays inside every endpoint's lane). The
server's RSS (summed over its processes) is sampled every --sample seconds; growth is measured from the end of the
warm-up (--warmup seconds) to the end. Untrained weights of --model: speed and memory do not depend on them.

Run inside a loopback-only namespace: ``scripts/isolated .venv/bin/python benchmarks/serve_soak.py``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import TIMEOUT_S, busy_cpu, post, served_model, tree_memory  # noqa: E402

MIX = (("denoise_1", 50), ("denoise_1_npy", 30), ("denoise_4", 8), ("image", 6), ("preview", 4), ("volume", 2))
"""Request kinds and their weights (per 100 requests)."""


def _multipart(field: str, filename: str, content: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = "soak" + os.urandom(8).hex()
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (fields or {}).items()
    ]
    parts.append(
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def requests_of_the_mix() -> dict[str, tuple[str, bytes, str]]:
    """kind -> (path, body, content type), from real MRI shipped in dipy and nibabel."""
    from PIL import Image

    rng = np.random.default_rng(0)
    t1 = np.load(resources.files("dipy") / "data/files/t1_coronal_slice.npy").astype(np.float32)
    t1 = np.clip(t1 / np.percentile(t1, 99.5), 0, 1)
    png = io.BytesIO()
    Image.fromarray((t1 * 255).astype(np.uint8)).save(png, format="PNG")
    volume = (resources.files("nibabel") / "tests/data/example4d.nii.gz").read_bytes()
    image_body, image_type = _multipart("image", "t1.png", png.getvalue())
    preview_body, preview_type = _multipart("file", "t1.png", png.getvalue(), {"add_noise": "true"})
    volume_body, volume_type = _multipart("volume", "example4d.nii.gz", volume)
    one = json.dumps({"slices": np.round(rng.random((1, 64, 64)), 4).tolist()}).encode()
    four = json.dumps({"slices": np.round(rng.random((4, 128, 128)), 4).tolist()}).encode()
    one_npy = io.BytesIO()
    np.save(one_npy, rng.random((1, 64, 64), dtype=np.float32))
    return {
        "denoise_1": ("/denoise", one, "application/json"),
        "denoise_1_npy": ("/denoise", one_npy.getvalue(), "application/x-npy"),
        "denoise_4": ("/denoise", four, "application/json"),
        "image": ("/denoise_image", image_body, image_type),
        "preview": ("/preview", preview_body, preview_type),
        "volume": ("/denoise_volume", volume_body, volume_type),
    }


class Soak:
    def __init__(self, url: str, mix: dict, concurrency: int, seconds: float, max_requests: int):
        self.host, port = url.removeprefix("http://").split(":")
        self.port, self.mix, self.concurrency = int(port), mix, concurrency
        self.deadline, self.left = time.perf_counter() + seconds, max_requests
        self.lock = threading.Lock()
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.kinds = [kind for kind, weight in MIX for _ in range(weight)]

    def _take(self) -> bool:
        with self.lock:
            if self.left <= 0 or time.perf_counter() >= self.deadline:
                return False
            self.left -= 1
            return True

    def _client(self, seed: int) -> None:
        pick = random.Random(seed)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S * 4)
        while self._take():
            kind = pick.choice(self.kinds)
            path, body, content_type = self.mix[kind]
            started = time.perf_counter()
            status, _ = post(conn, path, body, content_type)
            with self.lock:
                self.statuses[kind][status] += 1
                if status == 200:
                    self.latencies[kind].append(time.perf_counter() - started)
        conn.close()

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(self.concurrency)]
        for thread in threads:
            thread.start()
        return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the memory baseline")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    args = parser.parse_args()
    began = time.perf_counter()
    mix = requests_of_the_mix()
    with served_model(args.model, "serve-soak-") as (server, ready):
        rss_start = tree_memory(server)[0]
        soak = Soak(server.url, mix, args.concurrency, args.minutes * 60, args.max_requests)
        busy, started = busy_cpu(), time.perf_counter()
        threads = soak.run()
        samples: list[tuple[float, float]] = []
        while any(thread.is_alive() for thread in threads):
            time.sleep(args.sample)
            samples.append((time.perf_counter() - started, tree_memory(server)[0]))
            done = sum(sum(c.values()) for c in soak.statuses.values())
            errors = sum(n for c in soak.statuses.values() for s, n in c.items() if s != 200)
            print(f"{samples[-1][0]:6.0f} s  RSS {samples[-1][1]:6.0f} MB  {done:7d} requests  {errors} errors")
        wall = time.perf_counter() - started
        cores = (busy_cpu() - busy) / wall
        log = server.log_path.read_text(errors="replace").splitlines()
    baseline = next((rss for at, rss in samples if at >= args.warmup), samples[0][1])
    peak, last = max(rss for _, rss in samples), samples[-1][1]
    print()
    print("| request | count | req/s | errors | statuses | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for kind, _ in MIX:
        counts, lat = soak.statuses[kind], np.array(soak.latencies[kind]) * 1000
        total = sum(counts.values())
        errors = total - counts[200]
        p50 = f"{np.percentile(lat, 50):.0f}" if len(lat) else "-"
        p99 = f"{np.percentile(lat, 99):.0f}" if len(lat) else "-"
        print(f"| {kind} | {total} | {counts[200] / wall:.1f} | {errors} | {dict(counts)} | {p50} | {p99} |")
    total_errors = sum(n for c in soak.statuses.values() for s, n in c.items() if s != 200)
    tracebacks = sum(1 for line in log if line.startswith("Traceback"))
    print(
        f"\n{wall / 60:.1f} min at concurrency {args.concurrency}, model {args.model}: {total_errors} errors. RSS "
        f"{rss_start:.0f} MB at start, {baseline:.0f} after the {args.warmup:.0f} s warm-up, peak {peak:.0f}, end "
        f"{last:.0f}: growth after warm-up {(last - baseline) / baseline:+.1%} (target < 10 %). Server log: "
        f"{len(log)} lines, {tracebacks} tracebacks. Server ready in {ready:.1f} s. Machine: {psutil.cpu_count()} "
        f"cores, {cores:.2f} busy on average (load generator included). Whole run {time.perf_counter() - began:.0f} s."
    )


if __name__ == "__main__":
    main()
