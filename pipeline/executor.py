"""Run a build on Ray: one actor per GPU (or CPU actors), dynamic shard scheduling, retries.

The driver owns the plan and the manifest; actors own the models and write shards straight to
the output (local path or fsspec URL shared by all nodes). Shards go to whichever actor is free.
An actor that dies loses only its shard in flight: Ray restarts the actor (bounded) and the
shard is queued again for any free actor, at most ``max_retries`` times, after which the build
fails naming the shard and the cause. Completion is recorded in the manifest only after the
shard's bytes were committed by rename.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tsdfm.models.errors import ConfigError, TsdfmError
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.worker import ShardBuilder, ShardResult

STALL_SECONDS = 600  # fail when every live worker has been restarting this long


class BuildError(TsdfmError):
    """The build could not finish (a shard kept failing, no worker left, Ray unreachable)."""


@dataclass
class Progress:
    """What the progress callback receives after every committed shard."""

    done_shards: int
    total_shards: int
    trajectories: int
    total_trajectories: int
    seconds: float
    energy_gain: float | None
    retries: int
    event: str = ""


@dataclass
class ExecutionReport:
    results: dict[int, ShardResult] = field(default_factory=dict)
    retries: int = 0
    workers: int = 0
    device: str = "cpu"
    seconds: float = 0.0


class ShardActor:
    """Ray actor body: a ShardBuilder on the GPU Ray assigned to it (or on the CPU)."""

    def __init__(self, cfg_dict: dict, root: str, device: str, threads: int | None):
        import os

        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"  # fake GPUs in tests: CUDA_VISIBLE_DEVICES is set, CUDA is not there
        self.device = device
        self.builder = ShardBuilder(BuildConfig.from_dict(cfg_dict), root, device)
        self.pid = os.getpid()

    def info(self) -> dict:
        import os

        return {
            "pid": self.pid,
            "device": self.device,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def build(self, index: int) -> ShardResult:
        return self.builder.build(index)


def import_ray():
    """``ray``, or a ConfigError saying how to install it (only ``build`` needs Ray)."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            f"building needs Ray, which is not installed here ({e}); install the build side with "
            "`pip install 'tsdfm-pipeline[build]'` (distill, sample and eval do not need it)"
        ) from None
    return ray


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``), else start a fresh local one.

    Without an address a new local cluster always starts: ``ray.init()`` alone would attach to
    whatever cluster this machine ran last (``/tmp/ray/ray_current_cluster``), and wait for
    minutes when that one is gone. ``--address auto`` asks for exactly that behaviour.

    A local cluster listens on the loopback interface only (127.0.0.1): its ports run code as
    the user for anyone who can reach them. ``ray.init`` installs a SIGTERM handler of its own
    (``sys.exit`` from wherever the driver is); the caller's handler is put back.
    """
    import os
    import signal
    import threading

    ray = import_ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        _probe(address)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
        else:
            with _loopback_only():
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    log_to_driver=False,
                    include_dashboard=False,
                    _node_ip_address=LOOPBACK,
                )
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = address or "a local cluster"
        raise BuildError(
            f"could not connect to Ray at {where} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "check --address (host:port of a running head node) or omit it to start locally"
        ) from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_only():
    """Keep Ray from swapping 127.0.0.1 for the machine's routable address.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is rewritten to the address other hosts
    reach (``services.resolve_ip_for_localhost``), unless Ray believes clusters are disabled
    (its macOS/Windows default). For the duration of starting a local, single-machine cluster
    that is what we want: every Ray process then binds to loopback.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without the internal: it binds as it decides
        yield
        return
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast when nothing listens at host:port (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not host:port (e.g. 10.0.0.5:6379 or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise BuildError(
            f"no Ray head node reachable at {address} ({e.strerror or type(e).__name__}); "
            "start one with `ray start --head` or omit --address to run locally"
        ) from None


def plan_workers(device: str, num_workers: int | None) -> tuple[str, int, dict]:
    """Decide the actor kind and count from the cluster's resources.

    Returns (device, workers, ray actor options).
    """
    import ray

    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"--num-workers {num_workers} must be at least 1")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if device == "cuda" and gpus == 0:
        raise ConfigError(
            "--device cuda but the Ray cluster has no GPUs; use --device cpu or join a GPU "
            "cluster with --address"
        )
    if device in ("cuda", "auto") and gpus > 0:
        workers = num_workers or gpus
        if workers > gpus:
            raise ConfigError(
                f"--num-workers {workers} exceeds the cluster's {gpus} GPUs; each GPU worker "
                "needs its own GPU"
            )
        return "cuda", workers, {"num_gpus": 1, "num_cpus": 0}
    workers = num_workers or max(1, cpus)
    return "cpu", workers, {"num_cpus": 1}


def execute(
    cfg: BuildConfig,
    root: str,
    todo: list[int],
    on_result: Callable[[ShardResult], None],
    device: str = "auto",
    num_workers: int | None = None,
    max_retries: int = 3,
    progress: Callable[[Progress], None] | None = None,
    on_workers: Callable[[list[dict]], None] | None = None,
) -> ExecutionReport:
    """Build the shards in ``todo`` on Ray actors; ``on_result`` records each committed shard.

    Ray must already be connected (see :func:`connect`). ``on_workers`` receives each actor's
    pid, device and CUDA_VISIBLE_DEVICES once they are up.
    """
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    device, workers, options = plan_workers(device, num_workers)
    workers = min(workers, max(1, len(todo)))
    threads = 1 if device == "cpu" else None
    Actor = ray.remote(max_restarts=max_retries, max_task_retries=0)(ShardActor)
    actors = [
        Actor.options(**options).remote(cfg.to_dict(), root, device, threads)
        for _ in range(workers)
    ]
    report = ExecutionReport(workers=workers, device=device)
    if on_workers is not None:
        on_workers(ray.get([a.info.remote() for a in actors]))
    queue: deque[int] = deque(todo)
    attempts: dict[int, int] = {}
    idle = deque(actors)
    # shard builds (index, actor) and probes (None, actor) of actors that failed: an actor gets
    # shards again only after it answered a probe, so a worker whose node is gone (restart
    # pending, or impossible) cannot use up the retries of the shards queued behind it.
    in_flight: dict[Any, tuple[int | None, Any]] = {}
    alive = len(actors)
    stalled = 0.0  # since when no shard could be built (every live actor restarting)
    start = time.perf_counter()
    trajectories = 0
    gains: list[float] = []

    def building() -> bool:
        return any(i is not None for i, _ in in_flight.values())

    try:
        while queue or building():
            while queue and idle:
                index = queue.popleft()
                actor = idle.popleft()
                in_flight[actor.build.remote(index)] = (index, actor)
            if queue and not building():
                if alive == 0:
                    raise BuildError(f"every worker died; shards {sorted(queue)} were not built")
                stalled = stalled or time.perf_counter()
                if time.perf_counter() - stalled > STALL_SECONDS:
                    raise BuildError(
                        f"no worker came back for {STALL_SECONDS // 60} minutes (their nodes "
                        "are gone and Ray cannot place them again); add capacity and rerun the "
                        "same command to resume"
                    )
            else:
                stalled = 0.0
            ready: list = []
            while not ready:  # a timeout, so SIGINT / SIGTERM handlers get to run meanwhile
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            ref = ready[0]
            index, actor = in_flight.pop(ref)
            if index is None:  # a probe of a restarting actor
                try:
                    ray.get(ref)
                    idle.append(actor)
                except ActorDiedError:
                    alive -= 1  # Ray gave up restarting it
                except RayActorError:
                    time.sleep(1.0)  # restart pending (e.g. waiting for a node): ask again
                    in_flight[actor.info.remote()] = (None, actor)
                continue
            try:
                result: ShardResult = ray.get(ref)
            except RayActorError as e:
                attempts[index] = attempts.get(index, 0) + 1
                report.retries += 1
                if attempts[index] > max_retries:
                    raise BuildError(
                        f"shard {index} failed {attempts[index]} times; last cause: worker "
                        f"died ({_first_line(e)})"
                    ) from None
                queue.appendleft(index)
                # Ray restarts the actor (at most max_retries times): probe it before giving
                # it work; the probe fails with ActorDiedError once Ray has given up.
                in_flight[actor.info.remote()] = (None, actor)
                if progress:
                    progress(
                        _progress(
                            report,
                            cfg,
                            trajectories,
                            start,
                            gains,
                            f"worker died, shard {index} queued again",
                        )
                    )
                continue
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, Exception) else e
                if isinstance(cause, TsdfmError):
                    raise cause from None
                raise BuildError(
                    f"shard {index} failed: {type(cause).__name__}: {_first_line(cause)}"
                ) from None
            idle.append(actor)
            on_result(result)
            report.results[index] = result
            trajectories += result.info.rows
            if "energy_gain" in result.stats:
                gains.append(result.stats["energy_gain"])
            if progress:
                progress(_progress(report, cfg, trajectories, start, gains, f"shard {index}"))
    finally:
        for actor in actors:
            ray.kill(actor)
    report.seconds = time.perf_counter() - start
    return report


def _progress(report, cfg, trajectories, start, gains, event) -> Progress:
    return Progress(
        done_shards=len(report.results),
        total_shards=cfg.shards,
        trajectories=trajectories,
        total_trajectories=cfg.total_trajectories,
        seconds=time.perf_counter() - start,
        energy_gain=sum(gains) / len(gains) if gains else None,
        retries=report.retries,
        event=event,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
