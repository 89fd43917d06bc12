""".npy bodies for /denoise in-process: the header read and written without np.load / np.save, and the middleware
that answers them before BentoML's router, refusing bad input as the endpoint does. Served end to end in
tests/test_service.py."""

import asyncio
import io
import json

import numpy as np
import pytest

from service import binary
from service.batcher import GreedyBatcher
from service.imaging import InputError, check_slices


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "array",
    [
        np.linspace(0, 1, 3 * 64 * 64, dtype=np.float32).reshape(3, 64, 64),
        np.linspace(0, 1, 40 * 56).reshape(40, 56),  # float64, one slice
        np.arange(35, dtype=np.uint8).reshape(1, 5, 7),
        np.linspace(0, 1, 60, dtype=">f4").reshape(3, 4, 5),  # big-endian
        np.asfortranarray(np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)),  # not the plain header: np.load
    ],
    ids=["float32", "float64", "uint8", "big-endian", "fortran-order"],
)
def test_npy_bodies_read_as_np_load_reads_them(array):
    expected = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
    got = binary.read_npy(_npy(array))
    assert got.dtype == np.float32 and got.shape == array.shape
    np.testing.assert_array_equal(got, expected)


def test_broken_npy_bodies_are_refused_with_what_is_wrong():
    body = _npy(np.zeros((2, 8, 8), np.float32))
    for bad, says in (
        (body[:-1], "readable"),  # truncated
        (_npy(np.array([{"a": 1}], dtype=object)), "readable"),  # a pickle
        (b"not numpy", "not a NumPy .npy"),
        (_npy(np.zeros((2, 2), np.int64)), "dtype int64"),
    ):
        with pytest.raises(InputError, match=says):
            binary.read_npy(bad)


@pytest.mark.parametrize("shape", [(1, 64, 64), (3, 40, 56), (1, 1, 1)])
def test_written_answers_load_with_np_load_and_align_their_data(shape):
    slices = list(np.random.default_rng(0).random(shape, dtype=np.float32))
    body = binary.write_npy(slices)
    np.testing.assert_array_equal(np.load(io.BytesIO(body), allow_pickle=False), np.stack(slices))
    assert (len(body) - np.prod(shape) * 4) % 64 == 0  # the header ends where np.save's would: data 64-aligned


class App:
    """The app behind the middleware: answers 299 and records that it was called."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})


def _call(middleware, body: bytes, path="/denoise", content_type=binary.NPY, method="POST") -> tuple[int, dict, bytes]:
    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", content_type.encode())]}
    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]  # in two messages, as a slow client's

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def _validate(array: np.ndarray) -> list[np.ndarray]:
    return check_slices(array, max_slices=4, max_pixels=64 * 64)


def test_npy_requests_go_to_the_batcher_and_everything_else_to_the_app():
    app = App()
    batcher = GreedyBatcher(lambda slices: [s + 0.5 for s in slices], max_batch_size=8, max_latency_s=10)
    middleware = binary.Direct(app, "/denoise", batcher=lambda: batcher, validate=_validate)
    noisy = np.random.default_rng(1).random((2, 16, 24), dtype=np.float32) / 2

    status, headers, body = _call(middleware, _npy(noisy))
    assert (status, headers["content-type"], app.calls) == (200, binary.NPY, 0)
    assert int(headers["content-length"]) == len(body)
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), noisy + 0.5)

    for other in ({"content_type": "application/json"}, {"path": "/denoise_image"}, {"method": "PUT"}):
        assert _call(middleware, _npy(noisy), **other)[0] == 299
    assert app.calls == 3
    off = binary.Direct(app, "/denoise", batcher=lambda: None, validate=_validate)  # BentoML's dispatcher batches
    assert _call(off, _npy(noisy))[0] == 299 and app.calls == 4


def test_the_direct_path_refuses_as_the_endpoint_does():
    def overloaded(slices):
        raise AssertionError("never called: a refused request must not reach the model")

    batcher = GreedyBatcher(overloaded, max_batch_size=8, max_latency_s=10)
    middleware = binary.Direct(App(), "/denoise", batcher=lambda: batcher, validate=_validate)
    for bad, says in (
        (_npy(np.zeros((5, 8, 8), np.float32)), "more than the limit of 4"),
        (_npy(np.full((1, 8, 8), 2.0, np.float32)), "[0, 1]"),
        (_npy(np.zeros((1, 65, 64), np.float32)), "over the limit"),
        (b"\x93NUMPY broken", "readable"),
    ):
        status, headers, body = _call(middleware, bad)
        assert status == 400 and headers["content-type"] == "application/json", body
        assert says in json.loads(body)["error"]

    busy = GreedyBatcher(lambda slices: slices, max_batch_size=8, max_latency_s=-1)  # every request past its budget
    middleware = binary.Direct(App(), "/denoise", batcher=lambda: busy, validate=_validate)
    status, headers, body = _call(middleware, _npy(np.zeros((1, 8, 8), np.float32)))
    assert status == 503 and headers["retry-after"] == "1" and "overloaded" in json.loads(body)["error"]
