"""/denoise in binary: a ``.npy`` body in, a ``.npy`` body out, through the same batcher as JSON.

JSON costs more than the model for small slices: a 64 x 64 slice is 4,096 numbers written, parsed and validated each
way (``benchmarks/serve_throughput.py``). A request with ``Content-Type: application/x-npy`` carries the (N, H, W) or
(H, W) array as NumPy's own format (``np.save``; float32 in [0, 1], or uint8 0-255, never pickled objects); its answer
is the (N, H, W) float32 array in the same format. BentoML 1.4 has no input type for that beside JSON, so
:func:`service.errors.install`'s wrapper of its endpoint hands such a request here, and the array joins the same
batch queue as the JSON requests (the service's batcher, or BentoML's dispatcher with MRI_SERVICE_BATCHING=bentoml).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

from service.imaging import InputError

NPY = "application/x-npy"
NPY_TYPES = (NPY, "application/npy")
NPY_MAGIC = b"\x93NUMPY"


def read_npy(body: bytes) -> np.ndarray:
    """The array in a .npy body as float32 in [0, 1] (uint8 is divided by 255), or InputError."""
    if not body.startswith(NPY_MAGIC):
        raise InputError(
            f"not a NumPy .npy file: an {NPY} body must be one (np.save), got {len(body):,} bytes that are not; "
            "or send JSON",
            status=400,
        )
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:  # object arrays (pickles) and truncated or corrupt files
        raise InputError(f"not a readable .npy array ({exc})") from None
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype.kind != "f":
        raise InputError(f"expected float32 intensities in [0, 1] or uint8 pixels, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def write_npy(slices: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.stack([np.asarray(s, dtype=np.float32) for s in slices]), allow_pickle=False)
    return buffer.getvalue()


async def answer(factory: object, name: str, request: object, validate: Callable[[np.ndarray], list]) -> object:
    """Denoise a .npy request through the API's batch queue; the Response, or InputError for bad input."""
    from starlette.responses import Response

    slices = validate(read_npy(await request.body()))  # type: ignore[attr-defined]
    if factory.service.apis[name].batchable:  # type: ignore[attr-defined]  # MRI_SERVICE_BATCHING=bentoml
        output = await factory.batch_infer(name, (), {"slices": slices})  # type: ignore[attr-defined]
    else:  # the service's own batcher (service.batcher), as its JSON requests
        output = await factory._service_instance.batcher(slices)  # type: ignore[attr-defined]
    return Response(write_npy(output), media_type=NPY)
