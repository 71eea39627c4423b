"""The generic Ray executor on the session's local cluster: it knows nothing of shards.

A setup builds each actor's state once, a task runs on it per index; results come back in the
driver as they arrive, lost tasks are retried, task and setup errors stop the run in one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tsdfm.models.errors import ConfigError
from tsdfm.pipeline.executor import BuildError, Setup, TaskEvent, execute

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(autouse=True, scope="module")
def _by_value():
    """Ray's workers cannot import this test module: send its functions by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class Counter:
    """A setup: what an actor builds once (here: a base, its device, its pid, a call count)."""

    def __init__(self, base: int, *, scale: int = 1, device: str):
        self.base, self.scale, self.device = base, scale, device
        self.pid = os.getpid()
        self.calls = 0


def square(state: Counter, index: int) -> dict:
    state.calls += 1
    return {
        "value": state.base + state.scale * index * index,
        "device": state.device,
        "pid": state.pid,
        "calls": state.calls,
    }


def test_every_index_runs_once_on_states_built_once_per_actor():
    events: list[TaskEvent] = []
    workers: list[dict] = []
    report = execute(
        Setup(Counter, (10,), {"scale": 2}),
        square,
        [3, 0, 4, 1, 2],
        on_event=events.append,
        device="cpu",
        num_workers=2,
        on_workers=workers.extend,
    )
    assert {i: r["value"] for i, r in report.results.items()} == {
        i: 10 + 2 * i * i for i in range(5)
    }
    assert (report.device, report.workers, report.retries) == ("cpu", 2, 0)
    assert [e.kind for e in events] == ["done"] * 5 and [e.done for e in events] == [1, 2, 3, 4, 5]
    assert sorted(e.index for e in events) == [0, 1, 2, 3, 4]
    assert all(e.result == report.results[e.index] for e in events)
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and {r["pid"] for r in report.results.values()} <= pids
    # one state per actor: its call count goes 1, 2, ... over the tasks it ran
    for pid in pids:
        calls = sorted(r["calls"] for r in report.results.values() if r["pid"] == pid)
        assert calls == list(range(1, len(calls) + 1))
    assert {r["device"] for r in report.results.values()} == {"cpu"}


def test_fake_gpus_give_one_actor_per_gpu():
    report = execute(Setup(Counter, (0,)), square, range(4), device="auto")
    assert (report.device, report.workers) == ("cuda", 2)
    # CUDA_VISIBLE_DEVICES is set but CUDA is not there: the setup runs on the CPU
    assert {r["device"] for r in report.results.values()} == {"cpu"}


def test_fewer_indices_than_workers_start_fewer_actors():
    report = execute(Setup(Counter, (0,)), square, [7], device="cpu", num_workers=2)
    assert report.workers == 1 and report.results[7]["value"] == 49


def die_once(marker: str):
    """A task that kills its worker the first time it runs index 1 (a marker file remembers)."""

    def task(state: Counter, index: int) -> int:
        if index == 1 and not Path(marker).exists():
            Path(marker).write_text("died")
            os._exit(1)
        return index

    return task


def always_die(state: Counter, index: int) -> int:
    if index == 1:
        os._exit(1)
    return index


def test_a_dead_worker_loses_only_its_task_which_runs_again(tmp_path):
    events: list[TaskEvent] = []
    report = execute(
        Setup(Counter, (0,)),
        die_once(str(tmp_path / "marker")),
        [0, 1, 2, 3],
        on_event=events.append,
        device="cpu",
        num_workers=2,
        max_retries=2,
    )
    assert report.results == {0: 0, 1: 1, 2: 2, 3: 3} and report.retries == 1
    retry = [e for e in events if e.kind == "retry"]
    assert [(e.index, e.retries) for e in retry] == [(1, 1)] and retry[0].cause
    assert [e.index for e in events if e.kind == "done"].count(1) == 1


def test_a_task_that_keeps_killing_its_worker_stops_the_run_naming_it():
    with pytest.raises(BuildError, match=r"^shard 1 failed 2 times; last cause: worker died"):
        execute(
            Setup(Counter, (0,)),
            always_die,
            [1],
            device="cpu",
            num_workers=1,
            max_retries=1,
            noun="shard",
        )


def fail(state: Counter, index: int) -> int:
    if index == 2:
        raise ConfigError("index 2 is not allowed here")
    if index == 3:
        raise ZeroDivisionError("division by zero\nsecond line")
    return index


def test_a_task_error_stops_the_run_as_one_line():
    with pytest.raises(ConfigError, match=r"^index 2 is not allowed here$"):
        execute(Setup(Counter, (0,)), fail, [2], device="cpu", num_workers=1)
    with pytest.raises(BuildError) as e:
        execute(Setup(Counter, (0,)), fail, [3], device="cpu", num_workers=1)
    assert str(e.value) == "task 3 failed: ZeroDivisionError: division by zero"


class BrokenSetup:
    def __init__(self, kind: str, *, device: str):
        if kind == "user":
            raise ConfigError("the checkpoint does not fit its config")
        raise RuntimeError("CUDA out of memory\n(details)")


def test_a_setup_error_reaches_the_driver_itself():
    """Not 'every worker died': the error the setup raised (a user error as it is)."""
    with pytest.raises(ConfigError, match=r"^the checkpoint does not fit its config$"):
        execute(Setup(BrokenSetup, ("user",)), square, [0, 1], device="cpu", num_workers=2)
    with pytest.raises(BuildError) as e:
        execute(Setup(BrokenSetup, ("other",)), square, [0], device="cpu", num_workers=1)
    assert str(e.value) == "worker setup failed on cpu: RuntimeError: CUDA out of memory"


def test_an_error_in_the_result_callback_stops_the_run():
    def stop(event: TaskEvent) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(Setup(Counter, (0,)), square, range(3), on_event=stop, device="cpu", num_workers=1)


def ticking(state: Counter, index: int, tick) -> int:
    """Says 3 units done, then waits until the driver has seen them (a file it writes)."""
    import time

    tick(3)
    seen = Path(state.flag_dir) / f"seen-{index}"
    deadline = time.monotonic() + 120
    while not seen.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the driver never saw the progress")
        time.sleep(0.05)
    tick(2)
    return index


class Flags(Counter):
    def __init__(self, flag_dir: str, *, device: str):
        super().__init__(0, device=device)
        self.flag_dir = flag_dir


def test_a_task_in_flight_reports_its_units_before_it_finishes(tmp_path):
    events: list[TaskEvent] = []

    def on_event(event: TaskEvent) -> None:
        events.append(event)
        if event.kind == "progress" and event.units == 3:
            (tmp_path / f"seen-{event.index}").touch()

    report = execute(
        Setup(Flags, (str(tmp_path),)),
        ticking,
        [0, 1],
        on_event=on_event,
        device="cpu",
        num_workers=2,
        reports_progress=True,
    )
    assert report.results == {0: 0, 1: 1}
    for i in (0, 1):
        mine = [e for e in events if e.index == i]
        # the task cannot finish before the driver saw 3 units in flight: it waits for that
        assert mine[-1].kind == "done"
        assert {e.units for e in mine if e.kind == "progress"} >= {3}
        assert all(e.kind == "progress" for e in mine[:-1])
