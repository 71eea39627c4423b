"""Data-parallel distill under a real ``torchrun`` (gloo, 2 CPU processes): the ranks read
disjoint trajectories, the weights equal those of one process with the same global batch,
and a job with a killed rank resumes to the weights of an uninterrupted job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tsdfm.models.errors import ConfigError
from tsdfm.models.train.common import LOCK_FILE, RunLock
from tsdfm.models.train.distill import DistillConfig, train_student

WORKER = Path(__file__).with_name("ddp_run.py")


def _fields(data, init, out, **kw) -> dict:
    base = dict(
        data=str(data),
        init=str(init),
        out=str(out),
        steps=4,
        batch_size=4,
        grad_accum=2,  # the global batch: 2 micro-batches of 4 examples per step
        lr=3e-3,
        warmup=1,
        ema=0.9,
        streams=2,
        shuffle_buffer=6,
        heldout_fraction=0.2,
        heldout_trajectories=4,
        checkpoint_every=2,
        eval_every=4,
        log_every=1,
        precision="fp32",
        device="cpu",
        num_workers=0,
    )
    return {**base, **kw}


def _torchrun(fields: dict, *kill: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(WORKER), json.dumps(fields), *map(str, kill)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _torchrun_cli(fields: dict, *flags: str) -> subprocess.CompletedProcess:
    """``tsdfm-pipeline distill`` with the DistillConfig ``fields`` as flags, under torchrun."""
    names = {"init": "teacher", "steps": "train-steps"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "tsdfm.pipeline.cli", "distill", *flags]
    for key, value in fields.items():
        cmd += [f"--{names.get(key, key.replace('_', '-'))}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _state(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"checkpoints/step-{step:07d}/trainer_state.safetensors"))


def test_two_ranks_equal_one_process_and_resume_after_a_killed_rank(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher
):
    data, init = tiny_blind_dataset, saved_tiny_teacher
    one = train_student(DistillConfig(**_fields(data, init, tmp_path / "one")))

    job = _fields(data, init, tmp_path / "ddp")
    done = _torchrun(job)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ddp-ids-rank{r}.json").read_text()) for r in (0, 1)]
    seen = [{tid for batch in given for tid, _ in batch} for given in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint trajectories
    assert [len(given) for given in ranks] == [4, 4]  # one micro-batch per rank and step

    # the same global batch in one process: the same weights, optimizer moments and EMA
    a, b = _state(tmp_path / "one", 4), _state(tmp_path / "ddp", 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6), k
    lines = [json.loads(x) for x in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]  # rank 0 alone writes the metrics
    assert [m["loss"] for m in lines] == pytest.approx([h["loss"] for h in one.history], 1e-5)
    assert not (tmp_path / "ddp" / LOCK_FILE).exists()  # released at the end

    # rank 1 dies after step 3 (the newest checkpoint is step 2); the job is rerun
    crashed = _fields(data, init, tmp_path / "crashed")
    died = _torchrun(crashed, 1, 3)
    assert died.returncode != 0
    assert (tmp_path / "crashed/checkpoints/step-0000002").is_dir()
    assert not (tmp_path / "crashed/checkpoints/step-0000004").exists()
    shutil.copytree(tmp_path / "crashed", tmp_path / "shrink")  # the same crash, twice
    resumed = _torchrun_cli(crashed, "--eval-samples", "8")  # the CLI, as users launch it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # rank 0 alone reports and runs the final evaluation
    assert resumed.stdout.count("final checkpoint:") == 1, resumed.stdout
    assert resumed.stdout.count("final eval (8 samples") == 1, resumed.stdout
    assert json.loads((tmp_path / "crashed/eval.json").read_text())["config"]["samples"] == 8
    a, b = _state(tmp_path / "ddp", 4), _state(tmp_path / "crashed", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # on one process the job resumes too, and says what it cannot keep exact
    warned: list[str] = []
    shrunk = DistillConfig(**_fields(data, init, tmp_path / "shrink"))
    res = train_student(shrunk, warn=warned.append)
    assert [h["step"] for h in res.history] == [3, 4]
    assert any("checkpointed by 2" in w and "not those of an uninterrupted" in w for w in warned)
    c = _state(tmp_path / "shrink", 4)
    assert all(torch.allclose(a[k].double(), c[k].double(), rtol=1e-4, atol=1e-5) for k in a)


def test_a_run_folder_is_written_by_one_job(tmp_path, tiny_blind_dataset, saved_tiny_teacher):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        lock = RunLock(out, "other-job")
        lock.identity["pid"] = holder.pid  # a live process of another job holds the folder
        lock.acquire()
        cfg = DistillConfig(**_fields(tiny_blind_dataset, saved_tiny_teacher, out))
        with pytest.raises(ConfigError, match=r"is being written by job other-job \(pid"):
            train_student(cfg)
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and is taken over, with a note
    warned: list[str] = []
    res = train_student(cfg, warn=warned.append)
    assert res.steps == 4 and any("took over the lock of job other-job" in w for w in warned)
    assert not (out / LOCK_FILE).exists()
