"""Refused requests: one JSON shape for every error answer, one log line for each, a traceback only for bugs.

BentoML 1.4 answers bad input in three shapes (pydantic's ``{"error", "detail": [...]}``, a one-element list
``[{"error"}]`` for its own exceptions, ``{"error"}`` for a 500), answers 500 to any other exception raised while it
parses a request (a malformed multipart body, too many parts, a text field where a file belongs), and logs every one
of them with a full traceback (``ServiceAppFactory.api_endpoint_wrapper`` calls ``log_exception`` for all of them).
Here:

- :func:`install` wraps ``ServiceAppFactory.api_endpoint``, the call every API request goes through inside that
  wrapper, so that a refusal (bad input, an overloaded batch queue) comes back as an answer, not an exception:
  BentoML then logs no traceback and answers with its status. A bug still propagates, and is logged with its
  traceback and answered 500 as before. It also reads a multipart form with tight limits first and refuses a file
  field sent as text, which BentoML would otherwise take for a URL to download.
- :class:`Refusals`, an ASGI middleware, writes one line per 4xx or 503 answer (method, path, status, reason),
  whoever made it: the APIs, the body limit, the page's routes.

Every error answer is :data:`ERROR_SCHEMA`: ``{"error": message}``, plus ``detail`` (pydantic's errors: ``loc``,
``msg``, ``type``) when a field failed validation.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from service.batcher import Overloaded
from service.imaging import InputError

logger = logging.getLogger("service.refused")

MAX_FORM_PARTS = 16
"""Most files and most plain fields one multipart request may hold (the APIs take one file and at most two fields;
Starlette's own limit, 1,000 each, was answered with a 500 by BentoML)."""

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "description": "Every error answer: what was wrong and what to do.",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What was wrong and what to do, in one message."},
        "detail": {
            "type": "array",
            "description": "When fields failed validation: one entry per error, where (`loc`) and why.",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}


def error_response(
    status: int, message: str, detail: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if detail:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def refusal(exc: BaseException) -> JSONResponse | None:
    """The answer to a request refused with ``exc``; None when ``exc`` is a bug (answered 500, with its traceback)."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        detail = [
            {"loc": list(e["loc"]), "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" if d["loc"] else d["msg"] for d in detail)
        return error_response(400, message, detail)
    if isinstance(exc, InputError):
        return error_response(exc.status, str(exc))
    if isinstance(exc, Overloaded):  # waited past the latency budget in the service's batch queue
        message = f"the server is overloaded (this request {exc}); retry later, or send fewer slices"
        return error_response(503, message, headers={"Retry-After": "1"})
    if isinstance(exc, HTTPException) and exc.status_code < 500:  # Starlette's form parser
        return error_response(exc.status_code, str(exc.detail))
    if isinstance(exc, ClientDisconnect):  # the client left (over the body limit, admission answers 413 instead)
        return error_response(400, "the request body ended early: the client disconnected")
    if isinstance(exc, BentoMLException):
        status = exc.error_code.value
        if status == 503:  # the batch queue would miss max_latency_ms
            return error_response(503, f"the server is overloaded ({exc}); retry later, or send fewer slices")
        if status < 500:
            return error_response(status, str(exc))
    return None


async def check_form(input_spec: Any, request: Request) -> None:
    """For an API that takes files: the body must be a multipart form of at most MAX_FORM_PARTS parts, with files in
    the file fields and only there. Starlette keeps the parsed form on the request: BentoML does not parse it again."""
    files = getattr(input_spec, "multipart_fields", None)
    if not files:
        return
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        fields = ", ".join(f"`{name}`" for name in files)
        raise InputError(
            f"send multipart/form-data with the file in {fields}, got Content-Type {media_type or 'none'}", status=415
        )
    try:
        form = await request.form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
    except (HTTPException, ClientDisconnect):
        raise
    except Exception as exc:  # python-multipart and Starlette raise several types on a malformed body
        raise InputError(f"malformed multipart body ({type(exc).__name__}: {exc})") from None
    for name, value in form.multi_items():
        if name in files and isinstance(value, str):  # BentoML would take it for a URL to download
            raise InputError(f"`{name}` must be a file (a form part with a filename), got a text field")
        if name not in files and not isinstance(value, str):  # BentoML would decode it as UTF-8 JSON
            named = ", ".join(f"`{field}`" for field in files)
            raise InputError(f"`{name}` must be a plain form field, got a file; this API takes files in {named}")


def install(binary: dict[str, Callable[[Any], Any]] | None = None) -> None:
    """Route refusals around BentoML's exception logging (see the module's docstring). Idempotent.

    ``binary`` maps an API's name to the validator of its slices: that API also takes a ``.npy`` body
    (:mod:`service.binary`)."""
    from _bentoml_impl.server.app import ServiceAppFactory  # BentoML 1.4's server; no public hook for this

    from service import binary as npy

    original = ServiceAppFactory.api_endpoint
    if getattr(original, "refusals_installed", False):
        return
    binary = dict(binary or {})

    @functools.wraps(original)
    async def api_endpoint(self: Any, name: str, request: Request) -> Any:
        try:
            if name in binary:
                media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
                if media_type in npy.NPY_TYPES:
                    return await npy.answer(self, name, request, binary[name])
            await check_form(self.service.apis[name].input_spec, request)
            return await original(self, name, request)
        except Exception as exc:
            answer = refusal(exc)
            if answer is None:
                raise
            return answer

    api_endpoint.refusals_installed = True  # type: ignore[attr-defined]
    ServiceAppFactory.api_endpoint = api_endpoint
    # Libraries that log about the input they refuse, beside the exception they raise: the refusal's line says it.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # "Expected boundary character ..."
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # "data code ... not recognized" for a corrupt header


def _refused(status: int) -> bool:
    return 400 <= status < 500 or status == 503


class Refusals:
    """Log one line per refused request (4xx, 503): method, path, status and the answer's message."""

    max_reason = 300

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, body = 0, bytearray()

        async def watched_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and _refused(status) and len(body) < 4096:
                body.extend(message.get("body", b"")[:4096])
            await send(message)

        await self.app(scope, receive, watched_send)
        if _refused(status):
            client = (scope.get("client") or ("?", 0))[0]
            reason = self._reason(bytes(body))
            logger.warning("%s %s from %s %d: %s", scope.get("method"), scope.get("path"), client, status, reason)

    def _reason(self, body: bytes) -> str:
        try:
            payload = json.loads(body)
            reason = payload["error"] if isinstance(payload, dict) and "error" in payload else body.decode()
        except (ValueError, UnicodeDecodeError):
            reason = body.decode(errors="replace")
        reason = " ".join(str(reason).split())
        return reason if len(reason) <= self.max_reason else reason[: self.max_reason - 3] + "..."
