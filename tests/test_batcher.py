"""The /denoise batcher in-process: requests merged while the model is busy, each answered with its own slices,
refusals past the latency budget, and no state left behind by an overload or a failed batch."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from service.batcher import GreedyBatcher, Overloaded


class Model:
    """A stand-in forward call that records its batches, takes `seconds` and returns each slice + 1."""

    def __init__(self, seconds: float = 0.02, fail: int | None = None):
        self.batches: list[int] = []
        self.seconds, self.fail = seconds, fail
        self.threads: set[str] = set()

    def __call__(self, slices: list[np.ndarray]) -> list[np.ndarray]:
        self.batches.append(len(slices))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        if self.fail is not None and len(self.batches) == self.fail:
            raise RuntimeError("the model failed on this batch")
        return [image + 1 for image in slices]


def _requests(count: int, size: int = 1) -> list[list[np.ndarray]]:
    return [[np.full((4, 4), 10.0 * k + j, dtype=np.float32) for j in range(size)] for k in range(count)]


def test_waiting_requests_share_a_forward_call_and_each_gets_its_own_slices():
    model = Model()
    batcher = GreedyBatcher(model, max_batch_size=8, max_latency_s=10)
    requests = _requests(20) + _requests(2, size=12)  # two requests larger than a batch run alone

    async def main() -> list:
        return await asyncio.gather(*(batcher(request) for request in requests))

    answers = asyncio.run(main())
    for request, answer in zip(requests, answers, strict=True):
        assert len(answer) == len(request)
        for sent, got in zip(request, answer, strict=True):
            np.testing.assert_array_equal(got, sent + 1)
    # in arrival order, as many whole requests as fit in max_batch_size; a bigger request alone
    assert model.batches == [8, 8, 4, 12, 12]
    assert model.threads == {"denoise-batch_0"}  # one thread of its own, never the event loop's

    async def one_at_a_time() -> None:  # alone on an idle server, a request runs at once: no waiting to fill a batch
        for request in _requests(3):
            started = time.perf_counter()
            await batcher(request)
            assert time.perf_counter() - started < model.seconds + 0.5

    asyncio.run(one_at_a_time())
    assert model.batches[-3:] == [1, 1, 1]


def test_with_a_concurrency_of_two_two_forward_calls_run_at_once():
    """Two requests, the second while the first's call runs: with concurrency=2 it starts a second call at once
    rather than wait (each call waits at a barrier that only a second call running meanwhile lets through)."""
    barrier, threads = threading.Barrier(2, timeout=5), set()

    def model(slices: list[np.ndarray]) -> list[np.ndarray]:
        threads.add(threading.current_thread().name)
        barrier.wait()
        return [image + 1 for image in slices]

    batcher = GreedyBatcher(model, max_batch_size=8, max_latency_s=10, concurrency=2)
    requests = _requests(2)

    async def main() -> list:
        first = asyncio.ensure_future(batcher(requests[0]))
        await asyncio.sleep(0.2)  # its call has started (and waits at the barrier)
        return await asyncio.gather(first, batcher(requests[1]))

    for request, answer in zip(requests, asyncio.run(main()), strict=True):
        np.testing.assert_array_equal(answer[0], request[0] + 1)
    assert len(threads) == 2 and not barrier.broken


def test_past_the_latency_budget_requests_are_refused_and_later_ones_served():
    model = Model(seconds=0.3)
    batcher = GreedyBatcher(model, max_batch_size=2, max_latency_s=0.2)

    async def overload() -> list:
        return await asyncio.gather(*(batcher(r) for r in _requests(7)), return_exceptions=True)

    answers = asyncio.run(overload())
    refused = [a for a in answers if isinstance(a, Overloaded)]
    assert refused and "waited" in str(refused[0])
    assert all(isinstance(a, list) for a in answers if not isinstance(a, Overloaded))
    assert answers[0][0][0, 0] == 1  # the first ran at once

    async def after() -> list:  # once the overload is over, nothing remembers it
        return await asyncio.gather(*(batcher(r) for r in _requests(2)))

    assert [len(a) for a in asyncio.run(after())] == [1, 1]


def test_a_failed_batch_fails_its_requests_only():
    model = Model(seconds=0.05, fail=1)
    batcher = GreedyBatcher(model, max_batch_size=4, max_latency_s=10)

    async def main() -> list:
        return await asyncio.gather(*(batcher(r) for r in _requests(5)), return_exceptions=True)

    answers = asyncio.run(main())
    assert model.batches == [4, 1]
    assert all(isinstance(a, RuntimeError) for a in answers[:4]) and answers[4][0][0, 0] == 41


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_and_scores_as_fp32(native_checkpoint):
    from mri_platform.data import load_builtin
    from mri_platform.metrics import psnr_per_image
    from mri_platform.noise import NoiseConfig, fixed_noisy
    from mri_platform.steps import autocast_dtype
    from service.denoiser import Denoiser

    auto = Denoiser(native_checkpoint, precision="auto")
    native_bf16 = autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert auto.precision == ("bf16" if native_bf16 else "fp32")
    clean = load_builtin()[1].images[:24]
    noisy = fixed_noisy(torch.from_numpy(clean)[:, None], NoiseConfig(), seed=1234)[:, 0].numpy()
    exact, fast = (
        Denoiser(native_checkpoint, precision="fp32")(noisy),
        Denoiser(native_checkpoint, precision="bf16")(noisy),
    )
    assert np.abs(exact - fast).max() < 0.03
    target = torch.from_numpy(clean)[:, None]
    psnr = [float(psnr_per_image(torch.from_numpy(out)[:, None], target).mean()) for out in (exact, fast)]
    assert abs(psnr[0] - psnr[1]) < 0.05, psnr
    with pytest.raises(ValueError, match="precision must be one of"):
        Denoiser(native_checkpoint, precision="fp16")


def test_bulk_work_stops_at_its_next_pass_once_its_request_is_given_up(native_checkpoint):
    """A volume whose request timed out or whose client left stops within one forward pass, instead of computing
    on until MRI_SERVICE_WORK_S and taking passes from the slice API meanwhile."""
    from service.admission import Cancelled
    from service.denoiser import Denoiser

    denoiser = Denoiser(native_checkpoint, pass_pixels=256 * 256)  # 16 slices of 64 x 64 per pass
    volume = np.full((160, 64, 64), 0.5, dtype=np.float32)  # 10 passes
    passes: list[int] = []
    forward = denoiser._pass

    def counted(batch: np.ndarray) -> np.ndarray:
        passes.append(len(batch))
        if len(passes) == 2:
            given_up.set()  # as service._in_thread does when BentoML cancels the request
        return forward(batch)

    denoiser._pass = counted
    given_up = threading.Event()
    with pytest.raises(Cancelled):
        denoiser(volume, bulk=True, deadline=time.monotonic() + 60, cancelled=given_up)
    assert passes == [16, 16]
    assert denoiser(volume[:3], bulk=True).shape == (3, 64, 64)  # the gate was released
