"""The GPU-oriented build options on CPU: batch sizing by memory (--max-memory) and
torch.compile (--compile). The CUDA probe itself needs a GPU and is not run here."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tsdfm.models.checkpoint import load_checkpoint
from tsdfm.models.errors import ConfigError
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.pipeline import worker
from tsdfm.pipeline.build import run_build
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.manifest import Manifest
from tsdfm.pipeline.shards import read_shard
from tsdfm.pipeline.worker import ShardBuilder, estimate_row_bytes


def _cfg(teacher, compass=None, **kw) -> BuildConfig:
    k = 3 if compass is not None else 1
    nav = NavigatorConfig(student_steps=4, teacher_steps=16, candidates=k)
    base = dict(
        teacher=str(teacher),
        compass=None if compass is None else str(compass),
        shards=2,
        trajectories_per_shard=5,
        batch_size=5,
        navigator=nav,
        seed=4,
    )
    return BuildConfig(**{**base, **kw})


def _columns(root, shards):
    out = []
    for i in range(shards):
        table, _ = read_shard(str(root), f"data/train-{i:05d}-of-{shards:05d}.parquet")
        out.append(table.to_pydict())
    return out


def _per_trajectory(cfg) -> int:
    """K times the larger per-row estimate of teacher and compass (what fit_batch uses)."""
    models = [load_checkpoint(cfg.teacher).model]
    if cfg.compass is not None:
        models.append(load_checkpoint(cfg.compass).model)
    return cfg.navigator.candidates * max(estimate_row_bytes(m) for m in models)


def test_cpu_estimate_follows_the_model_shape(saved_tiny_teacher):
    model = load_checkpoint(saved_tiny_teacher).model
    b = model.config.backbone
    L, d, H, V = b.max_len, b.d_model, b.n_heads, b.vocab_out
    assert estimate_row_bytes(model) == 4 * L * ((4 + b.mlp_ratio) * d + H * L + 3 * V)
    wider = dataclasses.replace(model.config, backbone=dataclasses.replace(b, d_model=2 * d))
    grown = type(model)(wider)
    assert estimate_row_bytes(grown) - estimate_row_bytes(model) == 4 * L * (4 + b.mlp_ratio) * d


@pytest.mark.usefixtures("ray_cluster")
def test_max_memory_picks_a_batch_and_keeps_the_trajectories(
    tmp_path, saved_tiny_teacher, saved_tiny_compass
):
    fixed = _cfg(saved_tiny_teacher, saved_tiny_compass)
    per = _per_trajectory(fixed)
    budget = 2.5 * per / 2**30  # two trajectories fit, three do not
    auto = dataclasses.replace(fixed, max_memory=budget)
    a = run_build(fixed, str(tmp_path / "fixed"), num_workers=1, device="cpu")
    b = run_build(auto, str(tmp_path / "auto"), num_workers=1, device="cpu")
    assert a.fingerprint == b.fingerprint  # the batch is not content
    stats = [Manifest.load(str(tmp_path / "auto")).shard(i)["stats"] for i in range(2)]
    assert [s["batch_size"] for s in stats] == [2, 2]
    assert [s["activation_bytes_per_trajectory"] for s in stats] == [per, per]
    assert "batch_size" not in Manifest.load(str(tmp_path / "fixed")).shard(0)["stats"]
    # batches of 2, 2, 1 write the same trajectories, column by column, as one batch of 5
    assert _columns(tmp_path / "auto", 2) == _columns(tmp_path / "fixed", 2)
    _, meta = read_shard(str(tmp_path / "auto"), "data/train-00000-of-00002.parquet")
    assert meta["config"]["max_memory"] == budget and meta["config"]["batch_size"] == 5


def test_max_memory_caps_at_batch_size_and_refuses_a_budget_too_small(tmp_path, saved_tiny_teacher):
    cfg = _cfg(saved_tiny_teacher, max_memory=64.0)
    assert ShardBuilder(cfg, str(tmp_path / "a")).batch_size == 5  # fits far more than 5
    per = _per_trajectory(cfg)
    small = dataclasses.replace(cfg, max_memory=0.5 * per / 2**30)
    with pytest.raises(ConfigError, match=r"fits no trajectory: one needs .* raise --max-memory"):
        ShardBuilder(small, str(tmp_path / "b"))


def test_compile_without_a_c_compiler_is_refused_in_one_line(monkeypatch, saved_tiny_teacher):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    teacher = load_checkpoint(saved_tiny_teacher)
    with pytest.raises(ConfigError, match="--compile on CPU needs a C compiler"):
        worker.compile_models(teacher)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TSDFM_TEST_COMPILE"),
    reason="torch.compile takes about 2 minutes on 2 CPU cores: TSDFM_TEST_COMPILE=1 runs it",
)
def test_a_compiled_build_writes_the_uncompiled_trajectories(tmp_path, saved_tiny_teacher):
    """Compiled kernels round differently (~1e-5 in the logits), which changes no sampled
    token of this build: the compiled shard holds the same trajectories."""
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: torch.compile cannot run on this CPU")
    plain = _cfg(saved_tiny_teacher, shards=1)
    compiled = dataclasses.replace(plain, compile=True)
    reference = ShardBuilder(plain, str(tmp_path / "plain"))
    a = reference.build(0)
    builder = ShardBuilder(compiled, str(tmp_path / "compiled"))
    assert hasattr(builder.teacher.model, "_compiled_call_impl")
    assert builder.teacher.model._compiled_call_impl is not None
    b = builder.build(0)
    assert a.info.rows == b.info.rows == 5
    assert builder.provenance.fingerprint != reference.provenance.fingerprint
    pa, pb = _columns(tmp_path / "plain", 1)[0], _columns(tmp_path / "compiled", 1)[0]
    assert pa == pb


def _cli_build(teacher, out, *extra):
    from typer.testing import CliRunner

    from tsdfm.pipeline.cli import app

    args = ["build", "--teacher", teacher, "--out", out, "--shards", 1]
    args += ["--trajectories-per-shard", 3, "--batch-size", 3, "-S", 4, "-N", 16, "--k", 1]
    return CliRunner().invoke(app, [*map(str, args), "--device", "cpu", *map(str, extra)])


def test_cli_refuses_a_bad_max_memory_in_one_line(tmp_path, saved_tiny_teacher):
    res = _cli_build(saved_tiny_teacher, tmp_path / "ds", "--max-memory", 0)
    assert res.exit_code != 0
    assert "max_memory=0.0 must be a positive number of GiB" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists()


@pytest.mark.usefixtures("ray_cluster")
def test_cli_max_memory_reaches_the_workers(tmp_path, saved_tiny_teacher):
    per = _per_trajectory(_cfg(saved_tiny_teacher))
    res = _cli_build(saved_tiny_teacher, tmp_path / "ds", "--max-memory", 1.5 * per / 2**30)
    assert res.exit_code == 0, res.output
    m = Manifest.load(str(tmp_path / "ds"))
    assert m.shard(0)["stats"]["batch_size"] == 1 and m.shard(0)["rows"] == 3
