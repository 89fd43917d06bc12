"""What a training run does when one of its parts fails: a worker lost, MLflow away, S3 stalled.

Ray Train restarts its workers from the last checkpoint it registered, so the epoch in flight is done again. Its
MLflow points must not be logged twice: `EpochRecorder` logs an epoch only once Ray Train has registered its report
(on the controller, after every rank reported and the checkpoint was persisted), which is exactly the set of epochs
that will not be redone. It logs from a thread, retrying while MLflow is away, and the driver fills in from the
final checkpoint's history whatever it could not log (`missing_epochs`). A handled failure is told in one line.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from typing import Any

import ray.train

from mri_platform import tracking

FIRST_TRY_TIMEOUT_S = 5
"""The controller's own attempt to log an epoch gives up after this; the retrying thread goes on."""
RETRY_S = (1, 2, 5, 10, 20, 30)
"""Waits between attempts to log an epoch while MLflow does not answer (then every 30 s)."""

STORAGE_MARKERS = ("AWS Error", "S3", "pyarrow", "OSError", "IOError", "Timeout was reached", "storage")
WORKER_MARKERS = ("ActorDiedError", "ActorUnavailableError", "WorkerGroupError", "died", "Connection reset", "gloo")


def failure_kind(error: BaseException | str) -> str | None:
    """'storage' or 'worker' for a failure a resume from the last checkpoint can cure, else None (a bug, bad input)."""
    text = error if isinstance(error, str) else _chain_text(error)
    if any(marker in text for marker in STORAGE_MARKERS):
        return "storage"
    if any(marker in text for marker in WORKER_MARKERS):
        return "worker"
    return None


def _chain_text(error: BaseException) -> str:
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def describe_failure(worker_exceptions: dict[int, BaseException]) -> str:
    """One phrase for what went wrong: a lost worker rather than the connection resets it caused on the others."""
    for rank, error in sorted(worker_exceptions.items()):
        text = _chain_text(error)
        if "ActorDiedError" in text or "ActorUnavailableError" in text or "died" in text.lower():
            return f"worker {rank} was lost (its process died)"
    rank, error = min(worker_exceptions.items())
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    kind = failure_kind(error)
    what = {"storage": "a storage error", "worker": "a worker error"}.get(kind or "", "an error")
    return f"{what} on worker {rank}: {first.strip()[:160]}"


HANDLED_FAILURE_LOGGERS = ("ray.train.v2._internal.callbacks.backend_setup",)
"""Ray Train loggers that print a whole traceback for a failure the controller then handles by restarting the
workers ("Graceful shutdown of backend failed. This is expected if one of the workers has crashed.", with the lost
worker's ActorDiedError); `EpochRecorder.after_exception` says it in one line instead."""


def quiet_handled_failures() -> None:
    for name in HANDLED_FAILURE_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


class EpochRecorder(ray.train.UserCallback):
    """On the Ray Train controller: logs each registered epoch's metrics to MLflow once, and tells a handled failure.

    Registered epochs are never redone (the restart resumes from the last registered checkpoint), so each epoch gets
    exactly one point per metric. MLflow being away delays the points (a thread retries), it never fails the run.
    """

    def __init__(self, uri: str, run_id: str, max_failures: int) -> None:
        self.uri, self.run_id, self.max_failures = uri, run_id, max_failures
        self.last_epoch = 0
        self.failures = 0
        self._queue: queue.Queue | None = None
        self._logger: tracking.EpochLogger | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_queue": None, "_logger": None}  # they live on the controller only

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        quiet_handled_failures()  # unpickled on the controller: its loggers are the ones to quiet
        # The controller's first try at an epoch must fail fast when MLflow is away (the thread retries), not stall
        # the run for MLflow's own minutes of retries.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(FIRST_TRY_TIMEOUT_S)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        epoch_metrics = metrics[0]
        if "epoch" not in epoch_metrics:
            return
        self.last_epoch = int(epoch_metrics["epoch"])
        # Logged here first, before Tune sees the report: a trial it stops at once must still have its points.
        tried = False
        if self._queue is None or self._queue.empty():
            tried = True
            try:
                if self._logger is None:
                    self._logger = tracking.EpochLogger(self.uri, self.run_id)
                self._logger.log(dict(epoch_metrics), step=self.last_epoch)
                return
            except Exception:  # MLflow away: the thread takes it from here
                pass
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._log_forever, name="mlflow-epochs", daemon=True).start()
        self._queue.put((self.last_epoch, dict(epoch_metrics), tried))

    def after_exception(self, run_context, worker_exceptions: dict[int, BaseException]) -> None:
        self.failures += 1
        what = describe_failure(worker_exceptions)
        redo = self.last_epoch + 1
        if self.failures <= self.max_failures:
            since = f"the checkpoint of epoch {self.last_epoch}" if self.last_epoch else "the start"
            told = (f"training: {what}; restarting the workers from {since}, epoch {redo} is redone "
                    f"(restart {self.failures} of at most {self.max_failures})")  # fmt: skip
        else:
            told = f"training: {what} during epoch {redo}; no restarts left ({self.max_failures} used)"
        sys.__stdout__.write(told + "\n")
        sys.__stdout__.flush()

    def _log_forever(self) -> None:
        logger = tracking.EpochLogger(self.uri, self.run_id)
        while True:
            epoch, metrics, tried = self._queue.get()
            for attempt in range(10_000):
                try:
                    if (attempt or tried) and epoch in logger.logged_steps():  # a try landed, its answer did not
                        break
                    logger.log(metrics, step=epoch)
                    break
                except Exception as exc:  # MLflow away: wait and try again, the run goes on meanwhile
                    if attempt == 0:
                        sys.__stdout__.write(f"MLflow did not take epoch {epoch}'s metrics ({type(exc).__name__}); "
                                             "retrying until it answers\n")  # fmt: skip
                        sys.__stdout__.flush()
                    time.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])


def missing_epochs(uri: str, run_id: str, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epochs of `history` (a checkpoint's) that the run's MLflow record lacks."""
    logged = tracking.EpochLogger(uri, run_id).logged_steps()
    return [h for h in history if int(h["epoch"]) not in logged]
