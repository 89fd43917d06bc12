"""The OpenAPI spec at /docs.json, with the error answers the APIs really give.

BentoML 1.4 lists the same three errors under every API (400, 404, 500) as ``{"error": string, "detail": string}``;
the APIs answer 400, 408 (a body too slow to arrive), 413, 415, 500 and 503 (a batched API whose queue would miss
its latency budget, an endpoint whose lane is full: :mod:`service.admission`), all as
:data:`service.errors.ERROR_SCHEMA` (``detail`` is a list). The request and answer bodies themselves come from the
APIs' types (``service.imaging.slices_schema`` for /denoise); this middleware only rewrites the error answers,
since BentoML has no hook for them.
"""

from __future__ import annotations

import json
from typing import Any

from service.errors import ERROR_SCHEMA

BUSY = ("denoise_volume", "denoise_image", "preview")
"""APIs that answer 503 besides the batched ones: their lanes are small and their work is bounded in time."""
BINARY = {
    "denoise": "NumPy .npy (np.save, no pickles): (N, H, W) or (H, W) float32 in [0, 1] or uint8; the answer is "
    "(N, H, W) float32 as .npy"
}
"""APIs that also take and give .npy bodies (service.binary)."""
ERROR_REF = {"$ref": "#/components/schemas/Error"}
BENTOML_ERRORS = ("InvalidArgument", "NotFound", "InternalServerError")  # its components, replaced by Error
STATUSES = {
    400: "Bad input: the message says what was wrong and what to do.",
    408: "The request body did not arrive in time (MRI_SERVICE_BODY_IDLE_S, MRI_SERVICE_BODY_TOTAL_S).",
    413: "The request body, image or volume is over a limit (MRI_SERVICE_MAX_*).",
    415: "Wrong Content-Type: files go as multipart/form-data, /denoise takes JSON.",
    500: "A bug in the service (its traceback is in the server's log).",
    503: "Busy: the request would miss the batching latency budget, its endpoint already holds as many requests as "
    "it takes (see /info), or the work took longer than MRI_SERVICE_WORK_S; retry after Retry-After seconds.",
}


def fix_spec(spec: dict[str, Any], batched: set[str]) -> dict[str, Any]:
    """``spec`` (BentoML's) with every API's error answers as the service gives them; ``batched``: the APIs'
    names (``x-bentoml-name``) that can answer 503."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in BENTOML_ERRORS:
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            name = operation.get("x-bentoml-name") if isinstance(operation, dict) else None
            if name is None:
                continue  # BentoML's health and metrics endpoints
            responses = {code: answer for code, answer in operation["responses"].items() if code.startswith("2")}
            if name in BINARY:  # service.binary: the same API with .npy bodies each way
                npy = {"schema": {"type": "string", "format": "binary", "description": BINARY[name]}}
                operation.get("requestBody", {}).get("content", {})["application/x-npy"] = npy
                responses.get("200", {}).get("content", {})["application/x-npy"] = npy
            for status, description in STATUSES.items():
                if status != 503 or name in batched or name in BUSY:
                    responses[str(status)] = {
                        "description": description,
                        "content": {"application/json": {"schema": ERROR_REF}},
                    }
            operation["responses"] = responses
    return spec


class OpenAPIErrors:
    """ASGI middleware: answers GET ``path`` (BentoML's spec) with :func:`fix_spec` applied."""

    def __init__(self, app: Any, batched: list[str], path: str = "/docs.json"):
        self.app, self.batched, self.path = app, set(batched), path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def buffered_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, buffered_send)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body = json.dumps(fix_spec(json.loads(body), self.batched)).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            start["headers"] = [*headers, (b"content-length", str(len(body)).encode())]
        await send(start)
        await send({"type": "http.response.body", "body": body})
