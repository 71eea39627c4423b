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


def test_fsdp_equals_one_process_and_resumes_from_its_checkpoint(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher
):
    """``--fsdp`` (FSDP2, each rank holding half of every tensor): the full checkpoint it
    writes is that of one process with the same global batch, and a job resumed from its
    step-2 checkpoint ends where the uninterrupted one did."""
    data, init = tiny_blind_dataset, saved_tiny_teacher
    one = train_student(DistillConfig(**_fields(data, init, tmp_path / "one")))
    assert one.steps == 4

    job = _fields(data, init, tmp_path / "fsdp", fsdp=True)
    done = _torchrun(job)
    assert done.returncode == 0, done.stderr[-3000:]
    # the same tensors under the same names as a one-process run: weights, moments, EMA
    a, b = _state(tmp_path / "one", 4), _state(tmp_path / "fsdp", 4)
    assert a.keys() == b.keys()
    for k in a:
        assert _close_but_key_bias(k, a[k], b[k]), k
    meta = json.loads((tmp_path / "fsdp/checkpoints/step-0000004/trainer_state.json").read_text())
    one_meta = json.loads(
        (tmp_path / "one/checkpoints/step-0000004/trainer_state.json").read_text()
    )
    assert meta["optimizer"] == one_meta["optimizer"]  # numbered and grouped alike
    # the model files (checkpoint and final/) are full and load as any checkpoint does
    for rel in ("checkpoints/step-0000004", "final"):
        x = load_file(str(tmp_path / "one" / rel / "model.safetensors"))
        y = load_file(str(tmp_path / "fsdp" / rel / "model.safetensors"))
        assert x.keys() == y.keys()
        assert all(_close_but_key_bias(k, x[k], y[k]) for k in x), rel
    lines = [json.loads(x) for x in (tmp_path / "fsdp/metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in lines] == pytest.approx([h["loss"] for h in one.history], 1e-5)
    assert {m["sharding"] for m in lines} == {"fsdp"}

    # the same job stopped after its step-2 checkpoint, resumed: the full state is cut into
    # the ranks' slices again (weights, AdamW moments, EMA) and steps 3-4 are retaken
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "fsdp", stopped)
    shutil.rmtree(stopped / "checkpoints/step-0000004")
    shutil.rmtree(stopped / "final")
    again = _torchrun_cli(_fields(data, init, stopped), "--fsdp", "--eval-samples", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    c = _state(stopped, 4)
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)
    resumed = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in lines]  # bit for bit

    # its checkpoints are a one-process run's: one process resumes the job's step-2 checkpoint
    single = tmp_path / "single"
    shutil.copytree(stopped, single)
    shutil.rmtree(single / "checkpoints/step-0000004")
    shutil.rmtree(single / "final")
    warned: list[str] = []
    res = train_student(DistillConfig(**_fields(data, init, single)), warn=warned.append)
    assert [h["step"] for h in res.history] == [3, 4]
    assert any("checkpointed by 2" in w for w in warned)
    d = _state(single, 4)
    assert d.keys() == a.keys() and all(_close_but_key_bias(k, a[k], d[k]) for k in a)


def _close_but_key_bias(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float tolerance; the key third of an attention's qkv bias to 1e-4 only: its
    gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys), so
    AdamW divides the rounding noise of the gradient by its own size and moves it by up to
    η per step, in a direction that the order of the float sums decides."""
    a, b = a.double(), b.double()
    if name.endswith("qkv.bias"):
        d = a.numel() // 3
        key = slice(d, 2 * d)
        return torch.allclose(a[key], b[key], atol=1e-4) and _close_but_key_bias(
            "", torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        )
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp_needs_a_distributed_launch(tmp_path, tiny_blind_dataset, saved_tiny_teacher):
    cfg = DistillConfig(
        **_fields(tiny_blind_dataset, saved_tiny_teacher, tmp_path / "r", fsdp=True)
    )
    with pytest.raises(ConfigError, match=r"--fsdp shards .* one process; start it with `torchrun"):
        train_student(cfg)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TSDFM_TEST_COMPILE"),
    reason="torch.compile takes minutes on 2 CPU cores: TSDFM_TEST_COMPILE=1 runs it",
)
def test_a_compiled_student_trains_to_the_eager_weights(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher
):
    """``--compile`` changes the kernels, not the run: after 4 steps the weights, moments and
    EMA are the eager run's to 1e-4 and the losses to 1e-6 relative, the student's identity
    ignores the flag and the metrics lines record it."""
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: torch.compile cannot run on this CPU")
    data, init = tiny_blind_dataset, saved_tiny_teacher
    eager = DistillConfig(**_fields(data, init, tmp_path / "eager"))
    compiled = DistillConfig(**_fields(data, init, tmp_path / "compiled", compile=True))
    assert eager.identity_dict() == compiled.identity_dict()
    plain = train_student(eager)
    res = train_student(compiled)
    a, b = _state(tmp_path / "eager", 4), _state(tmp_path / "compiled", 4)
    assert a.keys() == b.keys()
    # compiled kernels fuse and reorder float sums (~1e-7 relative in the logits); AdamW's
    # normalised step turns that into up to ~2e-5 on a weight after 4 steps of η = 3e-3
    # (measured), against up to 4η = 1.2e-2 that a weight can move: 1e-4 is the tolerance
    worst = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:4]
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in plain.history])
    assert all(h.get("compiled") is True for h in res.history)
    cfg = json.loads((tmp_path / "compiled/final/config.json").read_text())
    assert "compile" not in cfg["provenance"]["run_config"]
