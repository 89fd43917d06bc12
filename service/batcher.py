"""Greedy batching for /denoise: whenever the model is free, one forward call takes every request that waits.

BentoML's adaptive batcher (``bentoml/_internal/marshal/dispatcher.py``, the CORK algorithm) holds requests back to
gather a batch the size its latency model predicts pays, polls its queue every millisecond, and runs one batch at a
time. Under a closed loop of 64 clients on 2 cores, its model thread was busy in forward passes about 55 % of the
time (py-spy): the rest went to corking waits and polling, while requests queued. Here a request waits only while an
earlier batch runs: the first request after an idle spell runs alone at once, and every request that came meanwhile
joins the next batch, up to ``max_batch_size`` slices (a request of more runs alone). No latency model to learn, so
nothing a burst can teach it that makes it refuse work once the burst is over.

With ``concurrency`` > 1, up to that many forward calls run at once (one per core, see :mod:`service.denoiser`): a
request that comes while all of them run waits for the first to end.

A request that has waited past ``max_latency_s`` when its batch would start is refused (503, worth retrying) rather
than run for a client that has likely given up; a request whose client went away is dropped from its batch.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

BATCH_METRIC = "mri_denoise_batch_size"


@functools.cache
def batch_histogram():  # noqa: ANN201 (prometheus_client's Histogram)
    """Requests merged into each /denoise forward call, on the server's /metrics (as BentoML's own dispatcher
    reports in ``bentoml_service_adaptive_batch_size``). Made on first use: BentoML points prometheus_client at its
    multiprocess folder only once the worker starts, after the service's module is imported."""
    from prometheus_client import Histogram

    buckets = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, float("inf"))
    return Histogram(BATCH_METRIC, "Requests merged into one /denoise forward call", buckets=buckets)


class Overloaded(Exception):
    """The request waited past the latency budget before a forward pass could take it."""


@dataclass
class _Job:
    slices: list[np.ndarray]
    future: asyncio.Future
    queued: float = field(default_factory=time.monotonic)


class GreedyBatcher:
    """Runs ``infer`` (slices -> slices, in order) over every waiting request's slices, on ``concurrency`` threads
    of its own."""

    def __init__(
        self,
        infer: Callable[[list[np.ndarray]], Sequence[np.ndarray]],
        *,
        max_batch_size: int,
        max_latency_s: float,
        observe: Callable[[float], None] | None = None,
        concurrency: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.infer, self.max_batch_size, self.max_latency_s = infer, max_batch_size, max_latency_s
        self.observe = observe or (lambda _: None)
        self.concurrency = concurrency
        self._queue: deque[_Job] = deque()
        self._draining = 0  # forward calls under way or starting
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="denoise-batch")

    async def __call__(self, slices: list[np.ndarray]) -> list[np.ndarray]:
        job = _Job(list(slices), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        if self._draining < self.concurrency:
            self._draining += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await job.future

    def _next_batch(self) -> list[_Job]:
        now, batch, count = time.monotonic(), [], 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # the client went away (its handler was cancelled)
                self._queue.popleft()
                continue
            if now - job.queued > self.max_latency_s:
                self._queue.popleft()
                job.future.set_exception(Overloaded(f"waited {now - job.queued:.1f} s for the model"))
                continue
            if batch and count + len(job.slices) > self.max_batch_size:
                break
            batch.append(self._queue.popleft())
            count += len(job.slices)
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while batch := self._next_batch():
                merged = [image for job in batch for image in job.slices]
                self.observe(len(batch))
                try:
                    restored = await loop.run_in_executor(self._threads, self.infer, merged)
                except Exception as exc:  # every request of the batch gets the error, the batcher goes on
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                start = 0
                for job in batch:
                    part, start = list(restored[start : start + len(job.slices)]), start + len(job.slices)
                    if not job.future.done():
                        job.future.set_result(part)
        finally:
            self._draining -= 1
