"""Run indexed tasks on Ray actors: one actor per GPU (or CPU actors), dynamic scheduling, retries.

The executor knows nothing of what its tasks make. The caller gives

- a :class:`Setup`: what each actor builds once when it starts, ``fn(*args, **kwargs,
  device=device)`` (e.g. loading models), kept as the actor's state;
- a task, ``task(state, index)``, run in an actor on that state for each index;
- the indices, the retries, and ``on_event``, which receives every finished task's result in
  the driver as it arrives (and every retry), in the order they happen.

A long task can say how far it got: with ``reports_progress=True`` it is called as
``task(state, index, tick)`` and calls ``tick(n)`` whenever ``n`` more units of its work are
done (trajectories, for a shard); the driver asks each busy actor about once a second and
``on_event`` also receives "progress" events with the units done so far of a task in flight.

Indices go to whichever actor is free. An actor that dies loses only its task in flight: Ray
restarts the actor (at most ``max_retries`` times) and the index is queued again for any free
actor, at most ``max_retries`` times, after which the run fails naming the index and the cause.
A restarting actor gets work again only after it answered a probe, so an actor whose node is
gone cannot use up the retries of the indices queued behind it. An error raised by a task (or
by the setup) stops the run at once: a :class:`TsdfmError` as it is, anything else as a
:class:`BuildError` naming the index.

Everything about the cluster lives here too: :func:`import_ray`, :func:`connect` (join an
address, or start a local cluster bound to loopback) and :func:`plan_workers` (which actors
the cluster's GPUs and CPUs allow).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from tsdfm.models.errors import ConfigError, TsdfmError

STALL_SECONDS = 600  # fail when every live worker has been restarting this long


class BuildError(TsdfmError):
    """The run could not finish (a task kept failing, no worker left, Ray unreachable)."""


@dataclass(frozen=True)
class Setup:
    """What each actor builds once: ``fn(*args, **kwargs, device=device)``.

    ``fn`` and its arguments travel to the actors by pickle: use an importable callable (a
    class, a module-level function) and plain data, not objects bound to the driver.
    """

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskEvent:
    """What ``on_event`` receives: a finished task (``done``), a lost one queued again, or how
    far a task in flight got (``progress``).

    Attributes:
        kind: "done" (``result`` holds what the task returned), "retry" (its worker died;
            ``cause`` says how) or "progress" (``units`` of the task in flight are done).
        index: the task's index.
        done: tasks finished so far, this one included.
        retries: retries so far, this one included.
        seconds: since the run started.
    """

    kind: Literal["done", "retry", "progress"]
    index: int
    done: int
    retries: int
    seconds: float
    result: Any = None
    cause: str = ""
    units: int = 0


@dataclass
class ExecutionReport:
    """How a run went: each index's result, the retries, the workers and their device."""

    results: dict[int, Any] = field(default_factory=dict)
    retries: int = 0
    workers: int = 0
    device: str = "cpu"
    seconds: float = 0.0


class Placement(NamedTuple):
    """Which actors a run gets: their device, how many, and their Ray resource options."""

    device: str
    workers: int
    options: dict


class TaskActor:
    """Ray actor body: the setup's state on the GPU Ray assigned to it (or on the CPU).

    A setup that raises does not kill the actor (Ray would only say that it died): the error
    is kept and raised by every task, so the driver gets the error itself.
    """

    def __init__(
        self, setup: Setup, task: Callable[[Any, int], Any], device: str, threads: int | None
    ):
        import os

        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"  # fake GPUs in tests: CUDA_VISIBLE_DEVICES is set, CUDA is not there
        self.device = device
        self.pid = os.getpid()
        self.task = task
        self.index: int | None = None
        self.units = 0  # of the task in flight, as its tick said (read by ``partial``)
        self.state: Any = None
        self.failure: BaseException | None = None
        try:
            self.state = setup.fn(*setup.args, **setup.kwargs, device=device)
        except TsdfmError as e:
            self.failure = e
        except Exception as e:
            self.failure = BuildError(
                f"worker setup failed on {device}: {type(e).__name__}: {_first_line(e)}"
            )

    def info(self) -> dict:
        import os

        return {
            "pid": self.pid,
            "device": self.device,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def run(self, index: int, reports_progress: bool = False) -> Any:
        if self.failure is not None:
            raise self.failure
        self.index, self.units = index, 0
        if reports_progress:
            return self.task(self.state, index, self._tick)
        return self.task(self.state, index)

    def _tick(self, n: int) -> None:
        self.units += n

    def partial(self) -> tuple[int | None, int]:
        """The index in flight and its units done (answered while ``run`` works: the actor
        runs two threads when its tasks report progress)."""
        return self.index, self.units


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


def plan_workers(device: str, num_workers: int | None) -> Placement:
    """Decide the actor kind and count from the connected cluster's resources.

    ``cuda`` (or ``auto`` on a cluster with GPUs): one actor per GPU, each holding one GPU
    (Ray sets its ``CUDA_VISIBLE_DEVICES``); else one single-threaded CPU actor per CPU.
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
        return Placement("cuda", workers, {"num_gpus": 1, "num_cpus": 0})
    workers = num_workers or max(1, cpus)
    return Placement("cpu", workers, {"num_cpus": 1})


def execute(
    setup: Setup,
    task: Callable[[Any, int], Any],
    indices: Sequence[int],
    *,
    on_event: Callable[[TaskEvent], None] | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    max_retries: int = 3,
    on_workers: Callable[[list[dict]], None] | None = None,
    name: str = "TaskActor",
    noun: str = "task",
    reports_progress: bool = False,
) -> ExecutionReport:
    """Run ``task(state, i)`` for every ``i`` in ``indices`` on Ray actors built by ``setup``.

    Ray must already be connected (see :func:`connect`). Every index runs until it succeeds
    once; ``on_event`` sees each result (and each retry) in the driver as it arrives, and an
    exception it raises stops the run (the actors are stopped either way).

    Args:
        setup: what each actor builds once (see :class:`Setup`).
        task: ``task(state, index) -> result``, importable (it travels by pickle).
        indices: what to run, in this order as far as actors are free.
        on_event: called with a :class:`TaskEvent` after every finished or retried task.
        device: "auto", "cuda" or "cpu" (see :func:`plan_workers`).
        num_workers: actors; default one per GPU, else one per CPU (never more than indices).
        max_retries: how often an index whose worker died runs again, and how often Ray
            restarts each actor.
        on_workers: receives each actor's pid, device and CUDA_VISIBLE_DEVICES once they
            are up.
        name: the actors' class name, as Ray shows it (``ray list actors``, process titles
            ``ray::<name>.run``).
        noun: what an index is called in error messages ("shard 3 failed ...").
        reports_progress: the task takes a third argument, ``tick(n)``; ``on_event`` then
            also gets "progress" events (about one a second per busy actor).
    """
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    device, workers, options = plan_workers(device, num_workers)
    workers = min(workers, max(1, len(indices)))
    threads = 1 if device == "cpu" else None
    body = type(name, (TaskActor,), {"__module__": TaskActor.__module__})
    # a second thread answers ``partial`` while ``run`` works
    concurrency = 2 if reports_progress else 1
    Actor = ray.remote(max_restarts=max_retries, max_task_retries=0, max_concurrency=concurrency)(
        body
    )
    actors = [Actor.options(**options).remote(setup, task, device, threads) for _ in range(workers)]
    report = ExecutionReport(workers=workers, device=device)
    start = time.perf_counter()

    def tell(kind, index: int, result: Any = None, cause: str = "", units: int = 0):
        if on_event is not None:
            seconds = time.perf_counter() - start
            done, retries = len(report.results), report.retries
            on_event(TaskEvent(kind, index, done, retries, seconds, result, cause, units))

    queue: deque[int] = deque(indices)
    attempts: dict[int, int] = {}
    idle = deque(actors)
    # tasks (index, actor) and probes (None, actor) of actors that failed: an actor gets work
    # again only after it answered a probe
    in_flight: dict[Any, tuple[int | None, Any]] = {}
    alive = len(actors)
    stalled = 0.0  # since when no task could run (every live actor restarting)
    polls: dict[Any, int] = {}  # partial() of a busy actor -> the index it runs
    polled: dict[int, float] = {}  # index -> when its actor was last asked

    def running() -> bool:
        return any(i is not None for i, _ in in_flight.values())

    try:
        if on_workers is not None:
            on_workers(ray.get([a.info.remote() for a in actors]))
        while queue or running():
            while queue and idle:
                index = queue.popleft()
                actor = idle.popleft()
                in_flight[actor.run.remote(index, reports_progress)] = (index, actor)
                polled[index] = time.perf_counter()
            if reports_progress:
                asked = set(polls.values())
                for index, actor in list(in_flight.values()):
                    now = time.perf_counter()
                    if index is not None and index not in asked and now - polled[index] >= 1.0:
                        polls[actor.partial.remote()] = index
                        polled[index] = now
            if queue and not running():
                if alive == 0:
                    raise BuildError(f"every worker died; {noun}s {sorted(queue)} were not built")
                stalled = stalled or time.perf_counter()
                if time.perf_counter() - stalled > STALL_SECONDS:
                    raise BuildError(
                        f"no worker came back for {STALL_SECONDS // 60} minutes (their nodes "
                        "are gone and Ray cannot place them again); add capacity and rerun the "
                        "same command to resume"
                    )
            else:
                stalled = 0.0
            # a timeout, so SIGINT / SIGTERM handlers get to run and busy actors get polled
            ready, _ = ray.wait([*in_flight, *polls], num_returns=1, timeout=1.0)
            if not ready:
                continue
            ref = ready[0]
            if ref in polls:
                index = polls.pop(ref)
                try:
                    now_index, units = ray.get(ref)
                except RayActorError:
                    continue  # its run reports how the actor died
                if now_index == index and index not in report.results:
                    tell("progress", index, units=units)
                continue
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
                result = ray.get(ref)
            except RayActorError as e:
                attempts[index] = attempts.get(index, 0) + 1
                report.retries += 1
                if attempts[index] > max_retries:
                    raise BuildError(
                        f"{noun} {index} failed {attempts[index]} times; last cause: worker "
                        f"died ({_first_line(e)})"
                    ) from None
                queue.appendleft(index)
                # Ray restarts the actor (at most max_retries times): probe it before giving
                # it work; the probe fails with ActorDiedError once Ray has given up.
                in_flight[actor.info.remote()] = (None, actor)
                tell("retry", index, cause=_first_line(e))
                continue
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, Exception) else e
                if isinstance(cause, TsdfmError):
                    raise cause from None
                raise BuildError(
                    f"{noun} {index} failed: {type(cause).__name__}: {_first_line(cause)}"
                ) from None
            idle.append(actor)
            report.results[index] = result
            tell("done", index, result)
    finally:
        for actor in actors:
            ray.kill(actor)
    report.seconds = time.perf_counter() - start
    return report


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
