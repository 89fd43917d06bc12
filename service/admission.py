"""Admission control for the service: what keeps one client, or one kind of request, from taking the rest down.

Three parts, all testable without a server:

- :class:`Admission`, an ASGI middleware in front of every API. It refuses a body over the size limit (413), reads
  the whole body under an idle and a total timeout (408), so that a slow or stalled client never holds a place in
  an API's queue, bounds the bytes of request bodies held at once, until they are answered (503), and then admits
  the request to its endpoint's :class:`Lane` (at most ``running`` at a time and ``waiting`` queued, 503 with
  ``Retry-After`` beyond).
- :class:`ModelGate`: at most ``passes`` forward passes at a time in the process (one per core on a CPU, each on
  its own core's thread), and the batched slice API (``urgent``) goes before bulk work (volumes and big images, cut
  into bounded passes). A volume therefore delays a slice batch by at most one pass, instead of sharing the cores
  with it for as long as the volume takes.
- :func:`arm_header_timeout`: uvicorn waits forever for a request's headers; this closes connections that do not
  complete them within a deadline.
- :func:`release_request_timers`: BentoML's request timeout leaves a timer behind each request for its whole
  ``traffic.timeout``, and with it everything the request touched; this cancels it when the request is done.

Measured with ``benchmarks/serve_hostile.py`` (see the README).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from mri_platform import heap

logger = logging.getLogger("mri_service")


class Cancelled(Exception):
    """Bulk work stopped between two forward passes because its deadline passed."""


# ------------------------------------------------------------------------------------------------- the model


class ModelGate:
    """At most ``passes`` forward passes at a time; urgent passes go first, but never more than ``urgent_streak`` in
    a row while a bulk pass waits.

    Python threads (the slice batcher's and the bulk passes of the other APIs) each take the gate around one
    forward pass. A pass is bounded (``Denoiser.pass_pixels``), so an urgent pass waits for at most one bulk pass.
    Without the gate, a volume's passes and the slice batches ran at the same time on the same cores, each with
    every core's worth of torch threads: the slices' latency grew with the volume's length. Without the streak
    limit, steady slice traffic starved every image and volume (an image took 23 s under 64 slice clients).

    ``passes`` > 1 is for passes of one thread each, one per core (``service.denoiser.configure_threads``): one pass
    whose threads span every core waits, at every layer, for the slowest of them, and a core that the HTTP side
    takes for a moment stalls the whole pass.
    """

    def __init__(self, urgent_streak: int = 2, passes: int = 1) -> None:
        if passes < 1:
            raise ValueError(f"passes must be at least 1, got {passes}")
        self._condition = threading.Condition()
        self._running = 0
        self._urgent_waiting = 0
        self._bulk_waiting = 0
        self._streak = 0  # urgent passes granted in a row while bulk work waited
        self.urgent_streak, self.passes = urgent_streak, passes

    def _bulk_due(self) -> bool:
        return self._bulk_waiting > 0 and self._streak >= self.urgent_streak

    @contextmanager
    def urgent(self) -> Iterator[None]:
        with self._condition:
            self._urgent_waiting += 1
            try:
                self._condition.wait_for(lambda: self._running < self.passes and not self._bulk_due())
            finally:
                self._urgent_waiting -= 1
            self._running += 1
            self._streak = self._streak + 1 if self._bulk_waiting else 0
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def bulk(self, deadline: float | None = None) -> Iterator[None]:
        """Raises :class:`Cancelled` if ``deadline`` (time.monotonic) passes before the gate is free."""
        with self._condition:
            self._bulk_waiting += 1
            try:
                while self._running >= self.passes or (self._urgent_waiting and self._streak < self.urgent_streak):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise Cancelled
                    self._condition.wait(timeout=left)
            finally:
                self._bulk_waiting -= 1
            self._running += 1
            self._streak = 0
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        with self._condition:
            self._running -= 1
            self._condition.notify_all()


# ------------------------------------------------------------------------------------------------ the lanes


@dataclass(frozen=True)
class LaneLimit:
    running: int
    """Requests of the endpoint handled at once."""
    waiting: int
    """Requests queued behind them; beyond, 503 at once."""


class Lane:
    """An endpoint's place in the service: ``running`` requests at once, ``waiting`` more queued, others refused."""

    def __init__(self, limit: LaneLimit):
        self.limit = limit
        self.running = 0
        self.waiting = 0
        self._free: asyncio.Condition | None = None

    @property
    def _condition(self) -> asyncio.Condition:
        if self._free is None:  # made on the server's event loop, at the first request
            self._free = asyncio.Condition()
        return self._free

    async def enter(self) -> bool:
        """True once admitted (call :meth:`leave` after), False if the lane and its queue are full."""
        if self.running < self.limit.running:
            self.running += 1
            return True
        if self.waiting >= self.limit.waiting:
            return False
        self.waiting += 1
        try:
            async with self._condition:
                await self._condition.wait_for(lambda: self.running < self.limit.running)
                self.running += 1
        finally:
            self.waiting -= 1
        return True

    async def leave(self) -> None:
        self.running -= 1
        async with self._condition:
            self._condition.notify(1)


@dataclass(frozen=True)
class AdmissionSettings:
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request body; bigger ones get 413 (MRI_SERVICE_MAX_REQUEST_MB)."""
    body_buffer_bytes: int = 256 * 1024 * 1024
    """Most bytes of request bodies held at once, from their first byte until they are answered: being read,
    queued in a lane or being processed (MRI_SERVICE_BODY_BUFFER_MB)."""
    body_idle_s: float = 10.0
    """A body that sends nothing for this long gets 408 (MRI_SERVICE_BODY_IDLE_S)."""
    body_total_s: float = 60.0
    """A body not received in full within this gets 408 (MRI_SERVICE_BODY_TOTAL_S)."""
    header_s: float = 10.0
    """A connection that does not complete a request's headers within this is closed (MRI_SERVICE_HEADER_S)."""

    def describe(self) -> dict[str, Any]:
        return asdict(self)


BODIES_BUSY = "the service holds as many request bodies as it takes at once (MRI_SERVICE_BODY_BUFFER_MB); retry shortly"


def _json_response(status: int, message: str, retry_after: int | None = None) -> tuple[dict, dict]:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}, {
        "type": "http.response.body",
        "body": body,
    }


async def _refuse(send: Callable, status: int, message: str, retry: int | None = None) -> None:
    """Answer with ``status`` and the JSON error ``message``; service.errors.Refusals, outside, logs it once."""
    start, body = _json_response(status, message, retry)
    await send(start)
    await send(body)


class Admission:
    """ASGI middleware: body limits and timeouts, then the endpoint's lane (see the module's docstring).

    ``lanes`` maps a path to its :class:`LaneLimit`; other paths (the page, /info, health, metrics, the spec)
    pass through untouched.
    """

    def __init__(self, app: Any, settings: AdmissionSettings, lanes: dict[str, LaneLimit]):
        self.app, self.settings = app, settings
        self.lanes = {path: Lane(limit) for path, limit in lanes.items()}
        self.buffered = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = self.settings.max_request_bytes
        length_header = dict(scope.get("headers") or []).get(b"content-length")
        declared = int(length_header) if length_header is not None and length_header.isdigit() else None
        if declared is not None and declared > limit:
            return await _refuse(send, 413, self._too_big(declared))
        held = [declared or 0]  # bytes of this request's body counted in self.buffered until it is answered
        if self.buffered + held[0] > self.settings.body_buffer_bytes:
            return await _refuse(send, 503, BODIES_BUSY, 2)
        self.buffered += held[0]
        try:
            await self._admit(scope, receive, send, path, held)
        finally:
            self.buffered -= held[0]

    async def _admit(self, scope: dict, receive: Callable, send: Callable, path: str, held: list[int]) -> None:
        body, problem = await self._read_body(receive, held)
        if problem is not None:
            status, message = problem
            if status == 0:
                return None  # the client went away: nobody to answer
            return await _refuse(send, status, message, 2 if status == 503 else None)

        lane = self.lanes.get(path)
        if lane is not None and not await lane.enter():
            return await _refuse(
                send,
                503,
                f"{path} is busy: {lane.limit.running} request(s) in progress and {lane.limit.waiting} queued, the "
                "most it takes at once; retry in a few seconds",
                5,
            )
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the app expects

        try:
            await self.app(scope, replay, send)
        finally:
            if lane is not None:
                await lane.leave()

    async def _read_body(self, receive: Callable, held: list[int]) -> tuple[bytes, tuple[int, str] | None]:
        """The whole body, or (b"", (status, message)): 413 over the limit, 408 too slow, 503 over the bytes held
        at once, 0 disconnected. A body longer than declared (or chunked) is added to ``held`` as it arrives."""
        settings, chunks, size = self.settings, [], 0
        deadline = time.monotonic() + settings.body_total_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), timeout=min(settings.body_idle_s, left))
                if message["type"] == "http.disconnect":
                    return b"", (0, "")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > settings.max_request_bytes:
                    return b"", (413, self._too_big(size))
                if size > held[0]:
                    grow = size - held[0]
                    if self.buffered + grow > settings.body_buffer_bytes:
                        return b"", (503, BODIES_BUSY)
                    self.buffered += grow
                    held[0] = size
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks), None
        except TimeoutError:
            return b"", (
                408,
                f"the request body was not received in time ({size:,} bytes after waiting; the service waits "
                f"{settings.body_idle_s:g} s between chunks and {settings.body_total_s:g} s in all)",
            )

    def _too_big(self, size: int) -> str:
        return (
            f"request body of {size:,} bytes is over the limit of {self.settings.max_request_bytes:,} bytes; "
            "send fewer slices per request or a smaller file (limit: MRI_SERVICE_MAX_REQUEST_MB)"
        )


# ------------------------------------------------------------------------------------------------- memory


def return_freed_memory(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 64 * 2**20) -> bool:
    """Have glibc give big freed blocks back to the system, and keep the forward passes' arrays in its heap.

    Allocations from ``mmap_threshold`` up (32 MiB, the most glibc takes; a volume's arrays) are mapped apart and
    unmapped when freed, for good, instead of glibc raising that threshold after the first big free and keeping later
    big arrays in its heap: without it, three 251^3 volumes left the server 1.3 GB bigger for good. Setting one
    threshold pins the other too, the trim threshold at 128 KiB unless set: so the heap keeps up to
    ``trim_threshold`` free at its top, and a pass's arrays (at most 16 MiB each: ``PASS_ACTIVATIONS`` values in
    fp32) are reused rather than mapped, zeroed by the kernel and unmapped again on every pass. The threshold was
    4 MiB before, with the trim threshold left pinned: AE2 in passes of 4 slices ran 142-174 slices/s in one process
    against 240-272 without any setting and 243-262 with these (2 cores, bf16). :func:`mri_platform.heap.trim`, after
    every image and volume, gives the free pages back. False where the C library is not glibc."""
    return heap.mallopt((heap.M_MMAP_THRESHOLD, mmap_threshold), (heap.M_TRIM_THRESHOLD, trim_threshold))


# --------------------------------------------------------------------------------------------- connections


def arm_header_timeout(seconds: float) -> None:
    """Close uvicorn connections that do not complete a request's headers within ``seconds`` of connecting or of
    their previous response.

    uvicorn's HTTP protocols (httptools' and h11's alike) arm their keep-alive timer only after a response and
    disarm it on any byte received, so a client that sends part of its headers and stops holds its connection
    forever. This wraps three methods of the protocol uvicorn's ``http="auto"`` serves with (httptools' when it is
    installed, as here; uvicorn 0.54); connections mid-request are left to the body timeout.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol as Protocol

    if getattr(Protocol, "_mri_header_timeout", None) is not None:
        Protocol._mri_header_timeout = seconds
        return
    Protocol._mri_header_timeout = seconds
    made, complete, lost = Protocol.connection_made, Protocol.on_response_complete, Protocol.connection_lost

    def arm(protocol: Any) -> None:
        disarm(protocol)  # one timer per connection: a keep-alive connection re-arms it after every response

        def expire() -> None:
            if protocol.transport.is_closing():
                return
            if protocol.cycle is None or protocol.cycle.response_complete:
                logger.warning(
                    "closed a connection from %s: no complete request headers within %g s",
                    (protocol.client or ("?",))[0],
                    Protocol._mri_header_timeout,
                )
                protocol.transport.close()

        protocol._mri_timer = protocol.loop.call_later(Protocol._mri_header_timeout, expire)

    def disarm(protocol: Any) -> None:
        timer = getattr(protocol, "_mri_timer", None)
        if timer is not None:
            timer.cancel()
            protocol._mri_timer = None

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        arm(self)

    def on_response_complete(self: Any) -> None:
        complete(self)
        arm(self)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        disarm(self)
        lost(self, exc)

    Protocol.connection_made = connection_made
    Protocol.on_response_complete = on_response_complete
    Protocol.connection_lost = connection_lost


def release_request_timers() -> None:
    """Cancel the timer of BentoML's request timeout once its request is done.

    BentoML 1.4's ``TimeoutMiddleware`` (``traffic.timeout``, 120 s here) arms ``loop.call_later`` for each request
    and never cancels it: every request's timer, its future and the context it was armed in stayed alive for
    120 s. At 480 requests/s that is tens of thousands of live objects per second of traffic; the garbage
    collector's full passes grew from 20 ms to 200 ms within seven seconds of load, stopping every client at once
    (p99 400 ms against p50 55 ms on ``benchmarks/serve_throughput.py``), and the heap grew for two minutes of any
    load. Same behaviour otherwise, and a request whose handler ends without answering no longer waits for the
    timeout (its error goes to Starlette's error handling at once). Idempotent.
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

    if getattr(TimeoutMiddleware, "_mri_releases_timers", False):
        return

    async def __call__(self: Any, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def started(message: dict) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receive, started))
        handler.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        except TimeoutError:
            if handler.cancel():
                answer = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(answer, status_code=504)(scope, receive, send)
        else:
            await handler
        finally:
            timer.cancel()

    TimeoutMiddleware.__call__ = __call__
    TimeoutMiddleware._mri_releases_timers = True
