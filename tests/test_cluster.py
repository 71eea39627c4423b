"""`build --address` on a multi-node Ray cluster (``ray.cluster_utils.Cluster``) that loses a node.

The test session already runs one Ray instance in this process (the conftest ``ray_cluster``
fixture), and a process can be connected to only one. So the cluster lives in a subprocess:
this file run as a script starts a head node without GPUs and ``GPU_NODES`` worker nodes with one
fake GPU each, connects the way ``tsdfm-pipeline build --address`` does, builds, and writes a
JSON report. pytest then checks the datasets on disk.

The subprocess gets its own ``RAY_TMPDIR``: ``Cluster`` records its address in
``$RAY_TMPDIR/ray/ray_current_cluster`` and leaves the file behind if it is not shut down
cleanly; with the default
``/tmp/ray`` every later plain ``ray.init(num_cpus=...)`` on the machine would try to join the
dead cluster and fail. Every node and the driver run with token authentication and one token
from the environment (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), as the KubeRay manifest
configures them; Ray 2.59+ enables token auth by itself on some paths (``address="auto"`` with
``~/.ray/auth_token`` present), and nodes that disagree on the mode cannot run actors.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

GPU_NODES = 3  # one more than the workers: the capacity a replacement node brings
WORKERS = 2
SHARDS = 6
ROWS_PER_SHARD = 8
REPO = Path(__file__).resolve().parents[1]


def _config(teacher: str):
    from tsdfm.models.navigator import NavigatorConfig
    from tsdfm.pipeline.config import BuildConfig

    nav = NavigatorConfig(student_steps=4, teacher_steps=128, candidates=1)
    return BuildConfig(
        teacher=teacher,
        shards=SHARDS,
        trajectories_per_shard=ROWS_PER_SHARD,
        batch_size=4,
        navigator=nav,
        seed=1,
    )


def _remove_busy_node(cluster, pids, first_commit, stop, removed) -> None:
    """After the first committed shard, SIGKILL the node of a worker that is building a shard.

    Ray titles a worker ``ray::ShardActor.run`` while the task runs and resets the title before
    the reply leaves the worker. A title read from outside can be stale by the time the node is
    killed (the shard finished, so nothing is retried), so the worker is frozen with SIGSTOP and
    its title read again: still building means the reply has not been sent.
    """
    import contextlib
    import signal

    import psutil  # vendored by Ray; importable once ray is imported
    from ray._private.ray_constants import PROCESS_TYPE_RAYLET

    def building(proc) -> bool:
        return " ".join(proc.cmdline()).startswith("ray::ShardActor.run")

    first_commit.wait(timeout=120)
    deadline = time.time() + 120
    while not stop.is_set() and time.time() < deadline:
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if not building(proc):
                    continue
                raylet = proc.ppid()  # Ray workers are children of their node's raylet
                proc.send_signal(signal.SIGSTOP)
                if not building(proc):
                    proc.send_signal(signal.SIGCONT)
                    continue
            except psutil.NoSuchProcess:
                continue
            for node in list(cluster.worker_nodes):
                if node.all_processes[PROCESS_TYPE_RAYLET][0].process.pid == raylet:
                    cluster.remove_node(node, allow_graceful=False)
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.send_signal(signal.SIGKILL)  # raylet gone: do not leave it stopped
                    removed.append({"actor_pid": pid, "node_id": node.node_id})
                    return
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)


def _gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether the process exited (or is a zombie) within ``timeout`` seconds."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def run_cluster_builds(teacher: str, out: Path) -> dict:
    """Start the cluster, build a reference and a node-losing dataset, report what happened."""
    import ray
    from ray.cluster_utils import Cluster

    from tsdfm.pipeline.build import run_build

    cfg = _config(teacher)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        for _ in range(GPU_NODES):
            cluster.add_node(num_cpus=1, num_gpus=1)
        # host:port, as `build --address HOST:PORT` passes it (probed, then joined)
        reference = run_build(
            cfg, str(out / "reference"), address=cluster.address, device="cuda", num_workers=WORKERS
        )
        resources = ray.cluster_resources()
        ray.shutdown()  # disconnect only; the cluster keeps running

        pids: list[int] = []
        events: list[str] = []
        removed: list[dict] = []
        first_commit, stop = threading.Event(), threading.Event()

        def on_progress(p) -> None:
            events.append(p.event)
            if p.event.startswith("shard "):
                first_commit.set()

        remover = threading.Thread(
            target=_remove_busy_node, args=(cluster, pids, first_commit, stop, removed)
        )
        remover.start()
        try:
            # 'auto', as the cluster launcher's head node runs it
            lost = run_build(
                cfg,
                str(out / "lost-node"),
                address="auto",
                device="cuda",
                num_workers=WORKERS,
                progress=on_progress,
                on_workers=lambda infos: pids.extend(i["pid"] for i in infos),
            )
        finally:
            stop.set()
            remover.join()
        killed_worker_gone = all(_gone(r["actor_pid"]) for r in removed)
        worker_nodes_left = len(cluster.worker_nodes)
        job = _run_build_job(cluster.address, teacher, out / "job", gpus=GPU_NODES - 1)
    finally:
        ray.shutdown()  # the driver must be gone before the head node is removed
        cluster.shutdown()
    return {
        "cluster_gpus": resources.get("GPU", 0),
        "reference": {
            "device": reference.execution.device,
            "workers": reference.execution.workers,
            "retries": reference.execution.retries,
        },
        "lost_node": {
            "device": lost.execution.device,
            "workers": lost.execution.workers,
            "retries": lost.execution.retries,
            "built": lost.built,
        },
        "events": events,
        "removed": removed,
        "killed_worker_gone": killed_worker_gone,
        "worker_nodes_left": worker_nodes_left,
        "job": job,
    }


def _run_build_job(address: str, teacher: str, out: Path, gpus: int) -> dict:
    """Run docker/build-job.sh (the cluster launcher's job) as a user would, on the head node.

    RAY_ADDRESS stands in for the address file that `ray start --head` leaves on a real head,
    so `--address auto` finds this cluster. No Hub repo: the publish step is not run here.
    """
    flags = "--k 1 --trajectories-per-shard {} --batch-size 4 --student-steps 4 "
    flags += "--teacher-steps 128 --seed 1 --num-workers {}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_ADDRESS": address,
        "TSDFM_OUT": str(out),
        "TSDFM_GPUS": str(gpus),
        "TSDFM_TEACHER": teacher,
        "TSDFM_SHARDS": str(SHARDS),
        "TSDFM_ARGS": flags.format(ROWS_PER_SHARD, WORKERS),
    }
    env.pop("TSDFM_REPO", None)
    proc = subprocess.run(
        ["bash", str(REPO / "docker" / "build-job.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {
        "returncode": proc.returncode,
        "stdout": proc.stdout[-2000:],
        "stderr": proc.stderr[-4000:],
    }


def _checksums(root: Path) -> dict[int, str]:
    from tsdfm.pipeline.manifest import Manifest

    m = Manifest.load(str(root))
    return {i: m.shard(i)["sha256"] for i in range(m.num_shards)}


def _trajectory_ids(root: Path) -> list[int]:
    from tsdfm.pipeline.shards import read_shard

    ids = []
    for i in range(SHARDS):
        table, meta = read_shard(str(root), f"data/train-{i:05d}-of-{SHARDS:05d}.parquet")
        assert meta["shard"] == i
        ids += table.column("trajectory_id").to_pylist()
    return ids


@pytest.mark.slow
def test_build_on_a_cluster_survives_losing_a_node(tmp_path, saved_tiny_teacher):
    """Three simulated GPU nodes, two workers; one node is killed while its worker builds a shard.

    The build completes on the remaining nodes: every trajectory exactly once, and the shards
    equal (sha256) those of an uninterrupted build on the same cluster. Then the cluster
    launcher's job script builds the same dataset through the CLI on the two nodes left.
    """
    ray_tmp = tempfile.mkdtemp(prefix="tsdfm-ray-")  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        OMP_NUM_THREADS="1",
    )
    report = tmp_path / "report.json"
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(saved_tiny_teacher), str(tmp_path), str(report)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, (
        f"cluster driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    r = json.loads(report.read_text())

    assert r["cluster_gpus"] == GPU_NODES
    assert r["reference"] == {"device": "cuda", "workers": WORKERS, "retries": 0}
    assert len(r["removed"]) == 1, "no worker was caught building a shard"
    assert r["killed_worker_gone"] and r["worker_nodes_left"] == GPU_NODES - 1
    lost = r["lost_node"]
    assert lost["device"] == "cuda" and lost["workers"] == WORKERS
    assert lost["built"] == list(range(SHARDS))
    assert lost["retries"] >= 1 and any("worker died" in e for e in r["events"])

    total = SHARDS * ROWS_PER_SHARD
    for name in ("reference", "lost-node"):
        assert sorted(_trajectory_ids(tmp_path / name)) == list(range(total))
    assert _checksums(tmp_path / "lost-node") == _checksums(tmp_path / "reference")

    # docker/build-job.sh, as the launcher runs it: same config through the CLI, same bytes
    job = r["job"]
    assert job["returncode"] == 0, f"build-job.sh failed:\n{job['stdout']}\n{job['stderr']}"
    assert _checksums(tmp_path / "job") == _checksums(tmp_path / "reference")


if __name__ == "__main__":
    teacher_dir, out_dir, report_path = sys.argv[1:4]
    result = run_cluster_builds(teacher_dir, Path(out_dir))
    Path(report_path).write_text(json.dumps(result, indent=2))
