"""The one way the platform joins or starts a Ray cluster, for training and for searches alike.

`ray job submit` sets RAY_ADDRESS and the driver joins that cluster; otherwise a local one starts in-process. Either
way the caller says what it needs (the CPUs and GPUs of its workers, a Tune trial driver's slot), and a need the
cluster cannot meet is refused with what is missing, after waiting `wait_s` seconds for an autoscaler to add nodes.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

DRIVER_RESOURCE = "TRAIN_DRIVER"
"""A custom resource a Tune trial's driver reserves instead of a CPU its workers need (`tuning.search`)."""
POLL_S = 1.0
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def _start_local() -> dict[str, Any]:
    """ray.init options of a local cluster (and the Ray Train settings that suit one).

    Ray Train frees the workers of a trial that Tune stopped through a PlacementGroupCleaner that asks the dashboard's
    state API whether the trial's controller is gone. It finds the API by scanning the machine for Ray instances and
    gives up when there are several; pointing it at ours keeps stopped trials from holding their CPUs forever.
    """
    from mri_platform.supervisor import free_port

    port = free_port()
    # Ray Train's preemption watcher polls for nodes being drained, which a local cluster never is; each one it starts
    # logs an error-level core_worker line ("has constructor arguments in the object store and max_restarts > 0").
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return {
        "resources": {DRIVER_RESOURCE: 64},
        "include_dashboard": True,
        "dashboard_port": port,
        "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    }


def missing(need: dict[str, float], have: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{resource: (needed, in the cluster)} for every resource the cluster holds too little of."""
    return {name: (amount, have.get(name, 0.0)) for name, amount in need.items() if have.get(name, 0.0) < amount}


def _describe(gaps: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{amount:g} {name} (the cluster has {held:g})" for name, (amount, held) in gaps.items())


def _hint(gaps: dict[str, tuple[float, float]]) -> str:
    if DRIVER_RESOURCE in gaps:
        return (f"Tune trial drivers reserve {DRIVER_RESOURCE!r} instead of a CPU: start the head with "
                f"`ray start --head --resources '{{\"{DRIVER_RESOURCE}\": 64}}'`")  # fmt: skip
    if "GPU" in gaps:
        return "run without --gpu on CPU machines, lower --workers, or add GPU nodes (--wait-for-resources SECONDS)"
    return "lower --workers, or add nodes (--wait-for-resources SECONDS gives an autoscaler time)"


def init_ray(
    per_worker: dict[str, float],
    *,
    workers: int = 1,
    wait_s: float = 0.0,
    what: str = "the workers",
    once: dict[str, float] | None = None,
    ask_workers: int | None = None,
) -> dict[str, float]:
    """Join or start Ray, then make sure the cluster holds `workers` x `per_worker` resources (and `once`, e.g. a
    trial driver's slot on the head); returns the cluster's resources.

    Missing resources are asked of the autoscaler (a no-op without one) as `ask_workers` (default `workers`) bundles
    of `per_worker`, one per worker, so that each fits one node, and waited for up to `wait_s` seconds, saying what
    is awaited; past that a RuntimeError names what was missing.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # A new local cluster takes token authentication, as it should; Ray says so at warning level on every
            # start ("Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out"). RAY_AUTH_MODE
            # cannot be set here instead: Ray reads it when imported, and a driver joining a cluster without tokens
            # must not send one.
            announcer = logging.getLogger(TOKEN_SETUP_LOGGER)
            level = announcer.level
            announcer.setLevel(logging.ERROR)
            try:
                # "local": without it ray.init joins whichever cluster the machine's last `ray start` recorded
                # (another user's job, a `stack up`), and fails there on the resources a new cluster is given.
                ray.init(address="local", log_to_driver=True, **_start_local())
            finally:
                announcer.setLevel(level)
    need = {name: amount * workers for name, amount in per_worker.items() if amount}
    for name, amount in (once or {}).items():
        need[name] = need.get(name, 0.0) + amount
    have = ray.cluster_resources()
    gaps = missing(need, have)
    if not gaps:
        return have
    deadline = time.monotonic() + wait_s
    if wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        bundle = {name: amount for name, amount in per_worker.items() if amount}
        request_resources(bundles=[bundle] * (ask_workers or workers))  # lets an autoscaler add the nodes
        print(f"waiting up to {wait_s:g} s for the cluster to hold {what}: {_describe(gaps)}", flush=True)
    while gaps and time.monotonic() < deadline:
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        have = ray.cluster_resources()
        gaps = missing(need, have)
    if gaps:
        waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
        raise RuntimeError(f"{what} need {_describe(gaps)}{waited}: {_hint(gaps)}")
    return have
