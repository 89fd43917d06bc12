"""/denoise in binary: a ``.npy`` body in, a ``.npy`` body out, through the same batcher as JSON.

JSON costs more than the model for small slices: a 64 x 64 slice is 4,096 numbers written, parsed and validated each
way (``benchmarks/serve_throughput.py``). A request with ``Content-Type: application/x-npy`` carries the (N, H, W) or
(H, W) array as NumPy's own format (``np.save``; float32 in [0, 1], or uint8 0-255, never pickled objects); its answer
is the (N, H, W) float32 array in the same format. BentoML 1.4 has no input type for that beside JSON, so
:func:`service.errors.install`'s wrapper of its endpoint hands such a request here, and the array joins the same
batch queue as the JSON requests (the service's batcher, or BentoML's dispatcher with MRI_SERVICE_BATCHING=bentoml).

With the service's batcher, :class:`Direct` answers such a request before it reaches BentoML's router: Starlette's
routing, BentoML's request context and endpoint wrapper and a Response object wrap every request, and for a 64 x 64
slice skipping them gave 1.18-1.25x the requests per second (``benchmarks/serve_throughput.py``, the README). Everything
outside it stays: the size limits, body timeouts and lanes (:mod:`service.admission`), the one log line per refusal,
BentoML's metrics and tracing middleware. A ``.npy`` header is read and written here rather than by ``np.load`` and
``np.save``, which parse it with ``ast.literal_eval``; anything but the plain header NumPy writes goes to ``np.load``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from service.errors import refusal
from service.imaging import InputError

NPY = "application/x-npy"
NPY_TYPES = (NPY, "application/npy")
NPY_MAGIC = b"\x93NUMPY"
_PLAIN_HEADER = re.compile(
    rb"\{'descr': '([<>|][a-z]\d{1,2})', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \} *\n"
)
"""The header ``np.save`` writes for a C-ordered array of plain numbers (format 1.0)."""


def _plain(body: bytes) -> np.ndarray | None:
    """The array of a .npy body with a plain header (:data:`_PLAIN_HEADER`), without copying; None otherwise."""
    if body[6:8] != b"\x01\x00" or len(body) < 10:
        return None
    end = 10 + int.from_bytes(body[8:10], "little")
    match = _PLAIN_HEADER.fullmatch(body, 10, end)
    if match is None:
        return None
    dtype = np.dtype(match[1].decode())
    shape = tuple(int(n) for n in match[2].split(b",") if n.strip())
    if len(body) - end != int(np.prod(shape)) * dtype.itemsize:
        return None  # truncated or padded: np.load says which
    return np.frombuffer(body, dtype, offset=end).reshape(shape)


def read_npy(body: bytes) -> np.ndarray:
    """The array in a .npy body as float32 in [0, 1] (uint8 is divided by 255), or InputError."""
    if not body.startswith(NPY_MAGIC):
        raise InputError(
            f"not a NumPy .npy file: an {NPY} body must be one (np.save), got {len(body):,} bytes that are not; "
            "or send JSON",
            status=400,
        )
    try:
        array = _plain(body)
        if array is None:
            array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:  # object arrays (pickles) and truncated or corrupt files
        raise InputError(f"not a readable .npy array ({exc})") from None
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype.kind != "f":
        raise InputError(f"expected float32 intensities in [0, 1] or uint8 pixels, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def write_npy(slices: list[np.ndarray]) -> bytes:
    """The slices as one (N, H, W) float32 array in .npy format 1.0, as ``np.save`` writes it."""
    array = np.ascontiguousarray(np.stack([np.asarray(s, dtype=np.float32) for s in slices]))
    header = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {array.shape!r}, }}"
    header += " " * (-(len(NPY_MAGIC) + 4 + len(header) + 1) % 64) + "\n"  # the data starts 64-byte aligned
    return NPY_MAGIC + b"\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + array.tobytes()


async def answer(factory: object, name: str, request: object, validate: Callable[[np.ndarray], list]) -> object:
    """Denoise a .npy request through the API's batch queue; the Response, or InputError for bad input."""
    from starlette.responses import Response

    slices = validate(read_npy(await request.body()))  # type: ignore[attr-defined]
    if factory.service.apis[name].batchable:  # type: ignore[attr-defined]  # MRI_SERVICE_BATCHING=bentoml
        output = await factory.batch_infer(name, (), {"slices": slices})  # type: ignore[attr-defined]
    else:  # the service's own batcher (service.batcher), as its JSON requests
        output = await factory._service_instance.batcher(slices)  # type: ignore[attr-defined]
    return Response(write_npy(output), media_type=NPY)


def is_npy(scope: dict) -> bool:
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            return value.split(b";")[0].strip().lower().decode("latin1") in NPY_TYPES
    return False


class Direct:
    """ASGI middleware: POST ``path`` with a .npy body goes straight to ``batcher()`` (see the module's docstring);
    every other request, and every request while ``batcher()`` is None, goes on to the app.

    ``batcher()`` is the service's batch queue once the service exists and the fast path applies;
    ``validate`` is the API's own check of the slices, so that both paths refuse alike."""

    def __init__(
        self,
        app: Any,
        path: str,
        batcher: Callable[[], Callable[[list[np.ndarray]], Awaitable[list[np.ndarray]]] | None],
        validate: Callable[[np.ndarray], list],
    ):
        self.app, self.path, self.batcher, self.validate = app, path, batcher, validate

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        run = self.batcher() if scope["type"] == "http" and scope.get("path") == self.path else None
        if run is None or scope.get("method") != "POST" or not is_npy(scope):
            return await self.app(scope, receive, send)
        try:
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away: nobody to answer
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            payload = write_npy(await run(self.validate(read_npy(b"".join(chunks)))))
        except Exception as exc:
            answer = refusal(exc)
            if answer is None:
                raise  # a bug: a 500, and its traceback in the log
            return await answer(scope, receive, send)
        headers = [(b"content-type", NPY.encode()), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
