"""`build` on a real local Ray cluster with tiny models: determinism, resume, failures."""

import json
import os
import signal
import threading
import time

import pytest

from tsdfm.models.errors import ConfigError
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.pipeline.build import run_build
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.manifest import Manifest, without_timings
from tsdfm.pipeline.shards import read_shard

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _cfg(teacher, **kw):
    nav = NavigatorConfig(student_steps=4, teacher_steps=32, candidates=1)
    base = dict(
        teacher=str(teacher),
        shards=4,
        trajectories_per_shard=6,
        batch_size=4,
        navigator=nav,
        seed=1,
    )
    base.update(kw)
    return BuildConfig(**base)


def _checksums(root):
    m = Manifest.load(str(root))
    return {i: m.shard(i)["sha256"] for i in range(m.num_shards)}


def _all_ids(root, n):
    ids = []
    for i in range(n):
        table, meta = read_shard(str(root), f"data/train-{i:05d}-of-{n:05d}.parquet")
        ids += table.column("trajectory_id").to_pylist()
        assert meta["shard"] == i
    return ids


def test_build_twice_gives_identical_shards(tmp_path, saved_tiny_teacher):
    cfg = _cfg(saved_tiny_teacher)
    a = run_build(cfg, str(tmp_path / "a"), num_workers=2, device="cpu")
    b = run_build(cfg, str(tmp_path / "b"), num_workers=1, device="cpu")
    assert a.fingerprint == b.fingerprint
    assert _checksums(tmp_path / "a") == _checksums(tmp_path / "b")
    assert sorted(_all_ids(tmp_path / "a", 4)) == list(range(24))
    assert a.totals["rows"] == 24 and a.totals["counters"]["trajectories"] == 24
    # rerunning a finished build skips every shard
    again = run_build(cfg, str(tmp_path / "a"), num_workers=2, device="cpu")
    assert again.built == [] and again.skipped == [0, 1, 2, 3]


def test_fake_gpus_give_each_actor_its_own_device(ray_cluster):
    import ray

    from tsdfm.pipeline.executor import plan_workers

    device, workers, options = plan_workers("auto", None)
    assert (device, workers, options) == ("cuda", 2, {"num_gpus": 1, "num_cpus": 0})

    @ray.remote(num_gpus=1, num_cpus=0)
    class Probe:
        def visible(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES")

    probes = [Probe.remote() for _ in range(2)]
    seen = ray.get([p.visible.remote() for p in probes])
    assert sorted(seen) == ["0", "1"]
    for p in probes:
        ray.kill(p)


def test_gpu_build_on_fake_gpus_matches_cpu_build(tmp_path, saved_tiny_teacher):
    cfg = _cfg(saved_tiny_teacher, shards=2)
    run_build(cfg, str(tmp_path / "gpu"), device="auto")  # 2 fake-GPU actors, CPU compute
    run_build(cfg, str(tmp_path / "cpu"), device="cpu", num_workers=1)
    assert _checksums(tmp_path / "gpu") == _checksums(tmp_path / "cpu")


def test_corrupt_shard_is_detected_and_rebuilt(tmp_path, saved_tiny_teacher):
    cfg = _cfg(saved_tiny_teacher)
    root = tmp_path / "ds"
    run_build(cfg, str(root), num_workers=2, device="cpu")
    good = _checksums(root)
    shard = root / "data/train-00002-of-00004.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    (root / "data/train-00000-of-00004.parquet").unlink()
    seen = {}
    res = run_build(
        cfg,
        str(root),
        num_workers=2,
        device="cpu",
        on_plan=lambda todo, done, corrupt: seen.update(todo=todo, corrupt=corrupt),
    )
    assert seen == {"todo": [0, 2], "corrupt": [0, 2]}
    assert res.built == [0, 2] and _checksums(root) == good


def test_changed_config_is_refused_unless_overwrite(tmp_path, saved_tiny_teacher):
    root = tmp_path / "ds"
    run_build(_cfg(saved_tiny_teacher, shards=2), str(root), device="cpu")
    with pytest.raises(ConfigError, match="holds a dataset with fingerprint"):
        run_build(_cfg(saved_tiny_teacher, shards=2, seed=2), str(root), device="cpu")
    res = run_build(
        _cfg(saved_tiny_teacher, shards=2, seed=2), str(root), device="cpu", overwrite=True
    )
    assert res.built == [0, 1]


def test_output_holding_other_files_is_refused(tmp_path, saved_tiny_teacher):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no tsdfm dataset"):
        run_build(_cfg(saved_tiny_teacher), str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match=r"has no GPUs|needs its own GPU"):
        run_build(_cfg(saved_tiny_teacher), str(tmp_path / "x"), device="cuda", num_workers=3)


def _fault_cfg(teacher) -> BuildConfig:
    """6 shards slow enough (N = 128) for a fault to land between two of them."""
    nav = NavigatorConfig(student_steps=4, teacher_steps=128, candidates=1)
    return _cfg(teacher, shards=6, trajectories_per_shard=8, navigator=nav)


@pytest.fixture(scope="module")
def fault_reference(tmp_path_factory, saved_tiny_teacher):
    """The uninterrupted build of :func:`_fault_cfg`, shared by the fault-injection tests."""
    root = tmp_path_factory.mktemp("fault") / "reference"
    run_build(_fault_cfg(saved_tiny_teacher), str(root), num_workers=2, device="cpu")
    return root


@pytest.mark.slow
def test_killed_worker_loses_only_its_shard(tmp_path, saved_tiny_teacher, fault_reference):
    """SIGKILL a worker process mid-build: the build completes, every trajectory once, and the
    shards equal an uninterrupted build's."""
    import psutil

    cfg = _fault_cfg(saved_tiny_teacher)
    reference = fault_reference
    root = tmp_path / "killed"
    killed = []
    events = []

    pids = []

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed and not finished.is_set():
            for pid in pids:
                try:
                    title = " ".join(psutil.Process(pid).cmdline())
                except psutil.NoSuchProcess:
                    continue
                if title.startswith("ray::ShardActor.run"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.02)

    finished = threading.Event()
    thread = threading.Thread(target=killer)
    thread.start()
    try:
        res = run_build(
            cfg,
            str(root),
            num_workers=2,
            device="cpu",
            progress=lambda p: events.append(p.event),
            on_workers=lambda infos: pids.extend(i["pid"] for i in infos),
        )
    finally:
        finished.set()
        thread.join()
    assert killed, "no worker was caught building"
    assert res.execution.retries >= 1 and any("worker died" in e for e in events)
    assert sorted(_all_ids(root, 6)) == list(range(48))
    assert _checksums(root) == _checksums(reference)
    # nothing left that looks complete but is not: no temp file of the killed writer
    from tsdfm.pipeline.verify import verify

    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]
    assert verify(str(root)).ok


@pytest.mark.slow
def test_interrupted_driver_resumes_to_the_same_dataset(tmp_path, saved_tiny_teacher):
    cfg = _cfg(saved_tiny_teacher, shards=5)
    reference = tmp_path / "reference"
    run_build(cfg, str(reference), num_workers=1, device="cpu")
    root = tmp_path / "ds"

    class Interrupt(KeyboardInterrupt):
        pass

    def stop_after_two(p):
        if p.done_shards == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_build(cfg, str(root), num_workers=1, device="cpu", progress=stop_after_two)
    assert len(Manifest.load(str(root)).committed()) == 2
    res = run_build(cfg, str(root), num_workers=1, device="cpu")
    assert len(res.skipped) == 2 and len(res.built) == 3
    assert _checksums(root) == _checksums(reference)


def test_shaped_build_is_deterministic_and_records_energies(
    tmp_path, saved_tiny_teacher, saved_tiny_compass
):
    nav = NavigatorConfig(student_steps=4, teacher_steps=32, candidates=3, tau=0.25)
    cfg = _cfg(saved_tiny_teacher, compass=str(saved_tiny_compass), shards=2, navigator=nav)
    run_build(cfg, str(tmp_path / "a"), num_workers=2, device="cpu")
    run_build(cfg, str(tmp_path / "b"), num_workers=1, device="cpu")
    assert _checksums(tmp_path / "a") == _checksums(tmp_path / "b")
    table, meta = read_shard(str(tmp_path / "a"), "data/train-00001-of-00002.parquet")
    assert meta["compass_identity"].startswith("sha256:") and meta["teacher_identity"]
    energies = table.column("energies").to_pylist()
    chosen = table.column("chosen").to_pylist()
    for e, c in zip(energies, chosen, strict=True):
        assert e[0] == [] and all(len(seg) == 3 for seg in e[1:])  # t_0 = 0 < tau: blind
        assert c[0] == 0 and all(seg[j] == min(seg) for seg, j in zip(e[1:], c[1:], strict=True))
    stats = Manifest.load(str(tmp_path / "a")).shard(1)["stats"]
    assert stats["energy_gain"] > 0 and stats["shaped_segments"] == 6 * 3


def test_compass_of_another_teacher_is_refused(tmp_path, saved_tiny_teacher, saved_tiny_compass):
    import json
    import shutil

    from tsdfm.models.errors import CheckpointError

    other = tmp_path / "compass"
    shutil.copytree(saved_tiny_compass, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["provenance"]["teacher_identity"] = "sha256:" + "0" * 64
    (other / "config.json").write_text(json.dumps(cfg))
    nav = NavigatorConfig(student_steps=4, teacher_steps=32, candidates=2)
    with pytest.raises(CheckpointError, match="not from teacher"):
        run_build(_cfg(saved_tiny_teacher, compass=str(other), navigator=nav), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def _nothing_written(root) -> bool:
    return not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": -1}, "--num-workers -1 must be at least 1"),
        ({"num_workers": 0}, "--num-workers 0 must be at least 1"),
        ({"max_retries": -1}, "--max-retries -1 must be 0 or more"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"device": "cuda:1"}, "a build runs one worker per GPU; use --device cuda"),
    ],
)
def test_bad_execution_arguments_are_refused_before_anything_is_written(
    tmp_path, saved_tiny_teacher, kwargs, message
):
    root = tmp_path / "ds"
    with pytest.raises(ConfigError, match=message):
        run_build(_cfg(saved_tiny_teacher), str(root), **{"device": "cpu", **kwargs})
    assert _nothing_written(root)


def test_a_build_that_cannot_reach_ray_or_its_gpus_leaves_the_folder_unlocked(
    tmp_path, saved_tiny_teacher, monkeypatch
):
    """Before: manifest.json was written first and then locked the folder to that config."""
    import ray

    import tsdfm.pipeline.build as build
    from tsdfm.pipeline.executor import BuildError

    root = tmp_path / "ds"

    def unreachable(address, num_cpus=None):
        raise BuildError(f"no Ray head node reachable at {address}")

    with monkeypatch.context() as m:
        m.setattr(build, "connect", unreachable)
        with pytest.raises(BuildError, match=r"no Ray head node reachable at 10\.0\.0\.9:6397"):
            run_build(_cfg(saved_tiny_teacher), str(root), address="10.0.0.9:6397")
    assert _nothing_written(root)
    with monkeypatch.context() as m:
        m.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # a cluster without GPUs
        with pytest.raises(ConfigError, match="--device cuda but the Ray cluster has no GPUs"):
            run_build(_cfg(saved_tiny_teacher), str(root), device="cuda")
    assert _nothing_written(root)
    # the folder is free: the same folder builds with another config
    res = run_build(_cfg(saved_tiny_teacher, shards=1), str(root), device="cpu", num_workers=1)
    assert res.built == [0]


def test_a_second_driver_on_the_same_out_is_refused(tmp_path, saved_tiny_teacher):
    from tsdfm.pipeline.lock import BuildLock, LockedError

    root = tmp_path / "ds"
    with BuildLock(str(root)), pytest.raises(LockedError, match="another build is writing to"):
        run_build(_cfg(saved_tiny_teacher), str(root), device="cpu", num_workers=1)
    assert _nothing_written(root)


def _findings(lines: list[str]) -> list[str]:
    """What a build said beyond its phase lines (Ray, workers starting, workers ready)."""
    phase = ("starting a local Ray cluster", "joining the Ray cluster at ")
    return [
        ln
        for ln in lines
        if not ln.startswith(phase)
        and "shard(s) to build: starting the workers" not in ln
        and "worker(s) ready on" not in ln
    ]


def test_temp_files_of_dead_writers_are_removed_and_the_build_verifies(
    tmp_path, saved_tiny_teacher
):
    """A worker killed while writing leaves ``.train-….tmp-…``; the finished build must not."""
    from tsdfm.pipeline.verify import verify

    root = tmp_path / "ds"
    leftover = root / "data" / ".train-00001-of-00002.parquet.tmp-0123456789abcdef"

    def worker_died_while_writing(p):
        leftover.write_bytes(b"PAR1 half a shard")

    lines = []
    run_build(
        _cfg(saved_tiny_teacher, shards=2),
        str(root),
        device="cpu",
        num_workers=1,
        progress=worker_died_while_writing,
        say=lines.append,
    )
    assert not leftover.exists() and not (root / ".tsdfm-build.lock").exists()
    assert _findings(lines) == ["removed 1 temp file(s) left by worker(s) that died"]
    assert lines[0] == "starting a local Ray cluster"  # the phase lines come first
    assert verify(str(root)).ok
    leftover.write_bytes(b"PAR1 half a shard")  # e.g. copied in from an older folder
    report = verify(str(root))
    assert not report.ok and [p.where for p in report.problems] == [
        "data/.train-00001-of-00002.parquet.tmp-0123456789abcdef"
    ]
    assert "temp file of a shard writer that died" in str(report.problems[0])
    assert "rerun the same build command" in str(report.problems[0])


def test_deleted_manifest_and_changed_tokenizer(tmp_path, saved_tiny_teacher):
    import json
    import shutil

    teacher = shutil.copytree(saved_tiny_teacher, tmp_path / "teacher")
    cfg = _cfg(teacher, shards=2)
    root = tmp_path / "ds"
    run_build(cfg, str(root), device="cpu", num_workers=1)
    good = _checksums(root)
    # manifest.json deleted: the same command rebuilds the shards in place, same bytes
    (root / "manifest.json").unlink()
    lines = []
    res = run_build(cfg, str(root), device="cpu", num_workers=1, say=lines.append)
    assert res.built == [0, 1] and _checksums(root) == good
    assert "manifest.json is missing: rebuilding every shard in place" in _findings(lines)[0]
    # ... while another config is refused with the way forward
    (root / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"holds the shards of another dataset.*--overwrite"):
        run_build(_cfg(teacher, shards=2, seed=2), str(root), device="cpu")
    run_build(cfg, str(root), device="cpu", num_workers=1)
    # the tokenizer changed since: a resume would mix two tokenizers in one dataset
    tok = teacher / "tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=1))
    with pytest.raises(ConfigError, match=r"built with tokenizer sha256:\w+, the teacher's") as e:
        run_build(cfg, str(root), device="cpu")
    assert "resuming would mix two tokenizers" in str(e.value)
    # a manifest from before the tokenizer was recorded: the shards' metadata tells
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["tokenizer_identity"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="resuming would mix two tokenizers"):
        run_build(cfg, str(root), device="cpu")


def test_a_local_cluster_binds_to_loopback_and_keeps_the_sigterm_handler(monkeypatch):
    """What `connect` asks of ray.init for a local cluster (without starting a second one)."""
    import signal

    import ray
    from ray._private import ray_constants

    from tsdfm.pipeline import executor

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        # read by services.resolve_ip_for_localhost while Ray starts the cluster
        seen["cluster_mode"] = ray_constants.ENABLE_RAY_CLUSTER
        signal.signal(signal.SIGTERM, lambda *a: None)  # ray.init installs its own handler

    def mine(signum, frame):
        pass

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = signal.signal(signal.SIGTERM, mine)
    try:
        executor.connect(None)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
    assert seen["address"] == "local" and seen["_node_ip_address"] == "127.0.0.1"
    # with clusters "disabled" Ray keeps 127.0.0.1 instead of the routable address
    assert seen["cluster_mode"] is False
    assert ray_constants.ENABLE_RAY_CLUSTER is True  # restored after the start


def test_building_without_ray_installed_is_one_line(tmp_path, saved_tiny_teacher, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    root = tmp_path / "ds"
    with pytest.raises(ConfigError, match=r"building needs Ray, which is not installed here"):
        run_build(_cfg(saved_tiny_teacher), str(root), device="cpu")
    assert _nothing_written(root)


def _signal_cli_build_after_first_shard(teacher, root, sig: int) -> tuple[int, str]:
    """Run the fault build (as :func:`_fault_cfg`) through the real `tsdfm-pipeline build`,
    send ``sig`` once its first shard is committed, and return its exit code and stderr."""
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("tsdfm-pipeline")
    argv = [str(cli), "build", "--teacher", str(teacher), "--out", str(root)]
    argv += ["--shards", "6", "--trajectories-per-shard", "8", "--batch-size", "4", "-S", "4"]
    argv += ["-N", "128", "--k", "1", "--seed", "1", "--device", "cpu", "--num-workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (root / "manifest.json").exists() and Manifest.load(str(root)).committed():
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_stops_a_cli_build_cleanly_and_a_rerun_finishes_it(
    tmp_path, saved_tiny_teacher, fault_reference
):
    """Fault injection: SIGTERM (what Kubernetes sends) to a real `tsdfm-pipeline build`
    after its first shard; then the same build resumes to the bytes of an uninterrupted one."""
    cfg = _fault_cfg(saved_tiny_teacher)
    reference = fault_reference
    root = tmp_path / "ds"
    returncode, err = _signal_cli_build_after_first_shard(saved_tiny_teacher, root, signal.SIGTERM)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert returncode == 143, err
    assert lines[-1] == "terminated (SIGTERM); rerun the same command to resume"
    assert "Traceback" not in err
    committed = Manifest.load(str(root)).committed()
    assert 1 <= len(committed) < 6
    assert not (root / ".tsdfm-build.lock").exists()  # released: the rerun needs no clean-up
    res = run_build(cfg, str(root), num_workers=1, device="cpu")
    assert res.skipped == committed and len(res.built) == 6 - len(committed)
    assert _checksums(root) == _checksums(reference)
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]


def test_the_driver_builds_no_model_and_reads_the_manifest_once(
    tmp_path, saved_tiny_teacher, saved_tiny_compass, monkeypatch
):
    """Identities come from the files; only the actors (other processes) load the models. A
    build reads manifest.json at most once (a resume) and keeps that one Manifest."""
    from tsdfm.models import checkpoint
    from tsdfm.pipeline import worker

    def no_model(*args, **kwargs):
        raise AssertionError("the driver built a model")

    monkeypatch.setattr(checkpoint, "load_checkpoint", no_model)
    monkeypatch.setattr(worker, "load_checkpoint", no_model)
    loads = []
    original = Manifest.load.__func__
    monkeypatch.setattr(
        Manifest, "load", classmethod(lambda cls, r: loads.append(r) or original(cls, r))
    )
    nav = NavigatorConfig(student_steps=4, teacher_steps=32, candidates=2)
    cfg = _cfg(saved_tiny_teacher, compass=str(saved_tiny_compass), shards=2, navigator=nav)
    root = tmp_path / "ds"
    first = run_build(cfg, str(root), device="cpu", num_workers=1)
    assert first.built == [0, 1] and loads == []
    (root / "data/train-00001-of-00002.parquet").unlink()
    again = run_build(cfg, str(root), device="cpu", num_workers=1)
    assert again.built == [1] and again.skipped == [0] and loads == [str(root)]
    on_disk = without_timings(json.loads((root / "manifest.json").read_text()))
    assert on_disk["totals"] == without_timings({"totals": first.totals})["totals"]


def test_weights_the_actors_cannot_load_fail_in_one_line_leaving_no_dataset(
    tmp_path, saved_tiny_teacher
):
    """The driver hashes the files and cannot know that the weights do not fit the
    architecture: the actors' error reaches the caller as it is, and the new folder is left
    as it was, so the rerun with the fixed checkpoint starts afresh."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tsdfm.models.errors import CheckpointError

    teacher = shutil.copytree(saved_tiny_teacher, tmp_path / "teacher")
    state = load_file(str(teacher / "model.safetensors"))
    name = sorted(state)[0]
    state[name + ".renamed"] = state.pop(name)
    save_file(state, str(teacher / "model.safetensors"))
    root = tmp_path / "ds"
    with pytest.raises(CheckpointError, match=r"do not fit its config\.json"):
        run_build(_cfg(teacher, shards=2), str(root), device="cpu", num_workers=1)
    assert _nothing_written(root)
    shutil.rmtree(teacher)
    shutil.copytree(saved_tiny_teacher, teacher)
    assert run_build(_cfg(teacher, shards=2), str(root), device="cpu", num_workers=1).built == [
        0,
        1,
    ]


def test_a_shard_builder_from_the_recorded_config_replays_moved_checkpoints(
    tmp_path, saved_tiny_teacher, saved_tiny_compass
):
    """``ShardBuilder(recorded, ..., teacher=, compass=)``: the checkpoints load from where
    they are now, the shard records the config as the build wrote it: the same bytes."""
    import dataclasses
    import shutil

    from tsdfm.pipeline.worker import ShardBuilder, identify

    teacher = shutil.copytree(saved_tiny_teacher, tmp_path / "teacher")
    compass = shutil.copytree(saved_tiny_compass, tmp_path / "compass")
    nav = NavigatorConfig(student_steps=4, teacher_steps=32, candidates=2)
    recorded = _cfg(teacher, compass=str(compass), shards=2, navigator=nav)
    root = tmp_path / "ds"
    run_build(recorded, str(root), device="cpu", num_workers=1)
    planned = identify(recorded)
    moved_t, moved_c = teacher.rename(tmp_path / "t2"), compass.rename(tmp_path / "c2")
    out = tmp_path / "replay"
    builder = ShardBuilder(
        recorded, str(out), "cpu", teacher=str(moved_t), compass=str(moved_c), planned=planned
    )
    assert builder.cfg == recorded and builder.provenance == planned
    ticks: list[int] = []  # the build's bar hears of every batch navigated
    result = builder.build(1, tick=ticks.append)
    per_shard, batch = recorded.trajectories_per_shard, recorded.batch_size
    assert ticks == [min(batch, per_shard - lo) for lo in range(0, per_shard, batch)]
    assert result.info.sha256 == Manifest.load(str(root)).shard(1)["sha256"]
    _, meta = read_shard(str(out), result.info.path)
    assert meta["config"]["teacher"] == str(teacher) and meta["config"]["compass"] == str(compass)
    # a worker that sees other checkpoint files than the driver did refuses to build
    other = dataclasses.replace(planned, teacher_identity="sha256:" + "0" * 64)
    with pytest.raises(ConfigError, match=r"the checkpoints this worker loaded are not the driver"):
        ShardBuilder(
            recorded, str(out), "cpu", teacher=str(moved_t), compass=str(moved_c), planned=other
        )


@pytest.mark.slow
def test_a_driver_killed_with_sigkill_resumes_to_the_same_bytes(
    tmp_path, saved_tiny_teacher, fault_reference
):
    """Fault injection: SIGKILL (no handler runs: the OOM killer, a lost node) to a real
    `tsdfm-pipeline build` after its first shard. The dead driver's lock is taken over, the
    rerun finishes the dataset byte-identical to an uninterrupted build, and nothing that
    looks complete but is not stays behind."""
    cfg = _fault_cfg(saved_tiny_teacher)
    root = tmp_path / "ds"
    returncode, _ = _signal_cli_build_after_first_shard(saved_tiny_teacher, root, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    committed = Manifest.load(str(root)).committed()
    assert 1 <= len(committed) < 6
    assert not (root / "README.md").exists()  # no card: the dataset does not look finished
    res = run_build(cfg, str(root), num_workers=1, device="cpu")
    assert res.skipped == committed and len(res.built) == 6 - len(committed)
    assert _checksums(root) == _checksums(fault_reference)
    assert not (root / ".tsdfm-build.lock").exists()
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]
