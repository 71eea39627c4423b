"""Any storage: ``distill --data`` and ``--out`` as ``file://`` and fsspec URLs, tested with
fsspec's real in-process ``memory://`` filesystem: the same integrity checks as a folder, the
same weights as a local run, and a run in the store resumed from the store."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.torch import load, load_file

from tsdfm.models.data.trajectories import open_trajectory_dataset, parse_dataset_spec
from tsdfm.models.errors import ConfigError, DataError, ShardError
from tsdfm.models.train.distill import DistillConfig, train_student


@pytest.fixture
def memory(monkeypatch, tmp_path):
    """A clean memory:// store, and a cache of this test's own."""
    monkeypatch.setenv("TSDFM_CACHE", str(tmp_path / "cache"))
    fs = MemoryFileSystem()
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    yield fs
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]


def _run(data, init, out, **kw) -> DistillConfig:
    fields = dict(
        data=str(data),
        init=str(init),
        out=str(out),
        steps=4,
        batch_size=4,
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
    return DistillConfig(**{**fields, **kw})


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final/model.safetensors"))


def test_dataset_specs_of_urls(tiny_blind_dataset):
    hub = parse_dataset_spec("hf://datasets/org/traj@v1.0")
    assert (hub.id, hub.revision, hub.local) == ("org/traj", "v1.0", False)
    assert parse_dataset_spec("hf://datasets/org/traj/").revision is None
    with pytest.raises(DataError, match="without a path inside it"):
        parse_dataset_spec("hf://datasets/org/traj@v1/data")
    ref = parse_dataset_spec(f"file://{tiny_blind_dataset}")
    assert (ref.id, ref.local, ref.url) == (str(tiny_blind_dataset.resolve()), True, None)
    with pytest.raises(DataError, match=r"not a storage URL|no fsspec driver|not installed"):
        parse_dataset_spec("nosuchproto://bucket/ds")


def test_data_in_an_object_store_is_checked_and_trains_like_the_folder(
    tmp_path, memory, tiny_blind_dataset, saved_tiny_teacher
):
    memory.put(str(tiny_blind_dataset), "/bucket/blind", recursive=True)
    url = "memory://bucket/blind"
    source = open_trajectory_dataset(url)
    local = open_trajectory_dataset(tiny_blind_dataset)
    assert str(source.ref) == url and source.ref.url == url
    assert source.digests is not None and len(source.files) == len(local.files) == 3
    assert source.verification()["sha256"] == f"every shard against {url}/manifest.json"
    assert source.provenance()["id"] == url and source.fingerprint == local.fingerprint

    a = train_student(_run(tiny_blind_dataset, saved_tiny_teacher, tmp_path / "a"))
    b = train_student(_run(url, saved_tiny_teacher, tmp_path / "b"))
    c = train_student(_run(f"file://{tiny_blind_dataset}", saved_tiny_teacher, tmp_path / "c"))
    wa, wb, wc = (_weights(tmp_path / r) for r in "abc")
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]) for k in wa)
    assert a.final_loss == b.final_loss == c.final_loss

    # a shard altered in the store: the cached copy still is the recorded shard and is kept;
    # without it, the altered bytes are refused before training and not kept in the cache
    shard = "/bucket/blind/data/train-00001-of-00003.parquet"
    blob = bytearray(memory.cat_file(shard))
    blob[100] ^= 0xFF
    memory.pipe_file(shard, bytes(blob))
    assert open_trajectory_dataset(url).files == source.files
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ShardError, match=r"train-00001-of-00003.parquet has sha256 .*records"):
        open_trajectory_dataset(url)
    assert not any((tmp_path / "cache").rglob("train-00001-of-00003.parquet"))
    with pytest.raises(ShardError, match="has sha256"):
        train_student(_run(url, saved_tiny_teacher, tmp_path / "d"))
    assert not (tmp_path / "d").exists()
    # a shard missing from the store: the split no longer matches the manifest
    memory.rm(shard)
    with pytest.raises(ShardError, match=r"recorded in manifest\.json but not in the train split"):
        open_trajectory_dataset(url)
    assert open_trajectory_dataset(url, verify=False).files  # --no-verify reads what is there


def test_a_run_in_an_object_store_resumes_from_the_store(
    tmp_path, memory, tiny_blind_dataset, saved_tiny_teacher
):
    whole = train_student(_run(tiny_blind_dataset, saved_tiny_teacher, "memory://runs/whole"))
    assert whole.location == "memory://runs/whole/final"
    names = {p.split("/runs/whole/", 1)[1] for p in memory.find("/runs/whole")}
    assert {"run_config.json", "metrics.jsonl", "final/model.safetensors"} <= names
    assert {n.split("/")[1] for n in names if n.startswith("checkpoints/")} == {
        "step-0000002",
        "step-0000004",
    }
    assert "run.lock" not in names  # released at the end, in the store too
    steps = [
        json.loads(x)["step"] for x in memory.cat_file("/runs/whole/metrics.jsonl").splitlines()
    ]
    assert steps == [1, 2, 3, 4]

    # a job that died after its step-2 upload: the store holds step 2 only, the machine nothing
    memory.copy("/runs/whole", "/runs/cut", recursive=True)
    for rel in ("final", "checkpoints/step-0000004"):
        memory.rm(f"/runs/cut/{rel}", recursive=True)
    shutil.rmtree(tmp_path / "cache" / "runs", ignore_errors=True)
    res = train_student(_run(tiny_blind_dataset, saved_tiny_teacher, "memory://runs/cut"))
    assert [h["step"] for h in res.history] == [3, 4]  # resumed from the store's step 2
    a = load(memory.cat_file("/runs/whole/final/model.safetensors"))
    b = load(memory.cat_file("/runs/cut/final/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in memory.cat_file("/runs/cut/metrics.jsonl").splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert [m["loss"] for m in lines] == [h["loss"] for h in whole.history]


def test_a_run_in_a_store_is_written_by_one_job(
    tmp_path, memory, tiny_blind_dataset, saved_tiny_teacher
):
    lock = {"job": "other-job", "host": "another-machine", "pid": 1, "started": "then"}
    memory.pipe_file("/runs/held/run.lock", json.dumps(lock).encode())
    with pytest.raises(ConfigError, match=r"is being written by job other-job \(pid 1 on another"):
        train_student(_run(tiny_blind_dataset, saved_tiny_teacher, "memory://runs/held"))
    assert memory.find("/runs/held") == ["/runs/held/run.lock"]  # nothing else was written


def test_cli_trains_from_and_to_a_store(tmp_path, memory, tiny_blind_dataset, saved_tiny_teacher):
    from typer.testing import CliRunner

    from tsdfm.pipeline.cli import app

    memory.put(str(tiny_blind_dataset), "/bucket/blind", recursive=True)
    args = ["distill", "--data", "memory://bucket/blind", "--out", "memory://runs/cli"]
    args += ["--teacher", str(saved_tiny_teacher), "--train-steps", "2", "--batch-size", "4"]
    args += ["--num-workers", "0", "--device", "cpu", "--eval-samples", "4", "--report-to", "none"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "dataset memory://bucket/blind: 3 shard(s)" in res.output
    assert "final checkpoint: memory://runs/cli/final" in res.output
    assert "-> memory://runs/cli/eval.json" in res.output
    report = json.loads(memory.cat_file("/runs/cli/eval.json"))
    assert report["config"]["samples"] == 4
    assert memory.isfile("/runs/cli/final/model.safetensors")
