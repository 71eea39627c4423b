"""Student distillation from a frozen trajectory dataset: examples, loss, loader, trainer, CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.models.data.schema import decode_rows
from tsdfm.models.data.trajectories import (
    LoaderConfig,
    TrajectoryLoader,
    heldout_mask,
    open_trajectory_dataset,
    parse_dataset_spec,
    trajectory_examples,
)
from tsdfm.models.errors import CheckpointError, ConfigError, DataError
from tsdfm.models.losses import segment_loss
from tsdfm.models.path import MixturePath, parse_scheduler
from tsdfm.models.train.distill import (
    DistillConfig,
    DistillWarning,
    StudentStep,
    build_student,
    prepare_run,
    train_student,
)

# --------------------------------------------------------------------------- pure pieces


def test_trajectory_examples_are_the_segments():
    M = 9
    times = np.array([0.0, 0.25, 0.5, 1.0], np.float32)  # a non-uniform grid, S = 3
    states = np.array(
        [
            [[M, M, M], [M, 4, M], [7, 4, M], [7, 4, 2]],
            [[M, M, M], [1, M, M], [1, M, 5], [1, 3, 5]],
        ],
        np.int32,
    )
    ex = trajectory_examples(times, states, np.array([10, 11]))
    assert len(ex) == 6
    assert ex.trajectory_id.tolist() == [10, 10, 10, 11, 11, 11]
    assert ex.segment.tolist() == [0, 1, 2, 0, 1, 2]
    assert ex.t.tolist() == [0.0, 0.25, 0.5] * 2
    assert ex.h.tolist() == [0.25, 0.25, 0.5] * 2
    assert ex.x_t[1].tolist() == [M, 4, M] and ex.x_next[1].tolist() == [7, 4, M]
    assert ex.x_t[5].tolist() == [1, M, 5] and ex.x_next[5].tolist() == [1, 3, 5]
    assert ex.x_1[:3].tolist() == [[7, 4, 2]] * 3 and ex.x_1[3:].tolist() == [[1, 3, 5]] * 3
    assert (ex.x_next[[2, 5]] == ex.x_1[[2, 5]]).all()  # the last segment lands on x_1
    assert np.allclose(ex.t + ex.h, np.tile(times[1:], 2))


def _logits(p: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log().float()


def test_segment_loss_mask_source_is_ce_on_revealed_positions():
    V, M = 3, 3
    path = MixturePath(parse_scheduler("linear"), "mask", V, M)
    logits = _logits([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]]])
    x_t = torch.tensor([[M, M, M, 0]])
    x_next = torch.tensor([[1, M, 2, 0]])  # positions 0 and 2 revealed, 1 stays, 3 was known
    x_1 = torch.tensor([[1, 0, 2, 0]])
    t, h = torch.tensor([0.25]), torch.tensor([0.25])
    loss = segment_loss(logits, x_t, x_next, x_1, t, h, path)
    expected = -(math.log(0.25) + math.log(0.6)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # λ = 0.5 adds the stayed-masked position 1 toward x_1 = 0 (p = 0.1) with weight 0.5
    loss = segment_loss(logits, x_t, x_next, x_1, t, h, path, final_weight=0.5)
    expected = -(math.log(0.25) + math.log(0.6) + 0.5 * math.log(0.1)) / 2.5
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_segment_loss_uniform_source_is_the_jump_rule_likelihood():
    V = 3
    path = MixturePath(parse_scheduler("linear"), "uniform", V)
    logits = _logits([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]])
    x_t = torch.tensor([[0, 2]])
    x_next = torch.tensor([[0, 1]])  # position 0 kept its token, position 1 jumped to 1
    x_1 = torch.tensor([[1, 1]])
    t, h = torch.tensor([0.25]), torch.tensor([0.25])
    q = (0.5 - 0.25) / (1 - 0.25)
    expected = -(math.log((1 - q) + q * 0.5) + math.log(q * 0.8)) / 2
    loss = segment_loss(logits, x_t, x_next, x_1, t, h, path)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the last step (t + h = 1) has q = 1: plain cross-entropy toward x_1 = x_next
    last = segment_loss(logits, x_t, x_1, x_1, torch.tensor([0.5]), torch.tensor([0.5]), path)
    assert last.item() == pytest.approx(-(math.log(0.25) + math.log(0.8)) / 2, rel=1e-5)


def test_heldout_mask_is_a_fixed_fraction_of_ids():
    ids = np.arange(20000)
    mask = heldout_mask(ids, 0.1)
    assert abs(mask.mean() - 0.1) < 0.01
    assert (heldout_mask(ids, 0.1) == mask).all() and not heldout_mask(ids, 0.0).any()
    assert (mask <= heldout_mask(ids, 0.2)).all()  # nested: a larger split contains a smaller


def test_dataset_specs():
    ref = parse_dataset_spec("org/traj@v1.0")
    assert (ref.id, ref.revision, ref.local) == ("org/traj", "v1.0", False)
    assert parse_dataset_spec("org/traj").revision is None
    with pytest.raises(DataError, match="not found"):
        parse_dataset_spec("./no/such/folder")


# --------------------------------------------------------------------------- the loader

LOADER = LoaderConfig(batch_size=8, shuffle_buffer=5, streams=2, heldout_fraction=0.2, seed=1)


def _ids(batches):
    return [(b.trajectory_id.tolist(), b.segment.tolist()) for b in batches]


def _take(loader, n):
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def test_loader_batches_are_the_rows_of_the_dataset(tiny_blind_dataset):
    src = open_trajectory_dataset(tiny_blind_dataset)
    manifest = json.loads((tiny_blind_dataset / "manifest.json").read_text())
    assert (src.num_steps, src.seq_len, len(src.files)) == (4, 8, 3)
    assert src.times.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert src.provenance()["fingerprint"] == manifest["fingerprint"]
    rows = {}
    for f in sorted((tiny_blind_dataset / "data").glob("*.parquet")):
        decoded = decode_rows(pq.read_table(f))  # v1 or v2: the same states
        rows.update(zip(decoded.ids.tolist(), decoded.states.tolist(), strict=True))
    held = {i for i in rows if heldout_mask(np.array([i]), 0.2)[0]}
    assert 0 < len(held) < len(rows)
    loader = TrajectoryLoader(src, LOADER)
    batches = _take(loader, 9)
    assert loader.state.epoch == 0  # 9 batches fit in the first epoch
    seen = set()
    for b in batches:
        assert b.x_t.shape == (8, 8) and b.x_t.dtype == torch.int64
        for j in range(len(b)):
            i, k = int(b.trajectory_id[j]), int(b.segment[j])
            assert i not in held
            assert b.x_t[j].tolist() == rows[i][k] and b.x_next[j].tolist() == rows[i][k + 1]
            assert b.x_1[j].tolist() == rows[i][4]
            assert b.t[j].item() == k / 4 and b.h[j].item() == 0.25
            seen.add((i, k))
    assert len(seen) == 72  # no example twice within an epoch
    heldout = loader.heldout(100)
    assert set(heldout.trajectory_id.tolist()) == held and len(heldout) == 4 * len(held)


def test_loader_resumes_exactly_and_ignores_worker_count(tiny_blind_dataset):
    src = open_trajectory_dataset(tiny_blind_dataset)
    first = TrajectoryLoader(src, LOADER)
    it = iter(first)
    reference = [next(it) for _ in range(11)]
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as in a checkpoint
    reference += [next(it) for _ in range(14)]  # crosses two epoch boundaries
    it.close()
    resumed = TrajectoryLoader(src, LOADER)
    resumed.load_state_dict(state)
    assert _ids(_take(resumed, 14)) == _ids(reference[11:])
    parallel = TrajectoryLoader(src, LOADER, num_workers=2)
    assert _ids(_take(parallel, 25)) == _ids(reference)
    other_seed = TrajectoryLoader(src, LoaderConfig(**{**LOADER.__dict__, "seed": 2}))
    assert _ids(_take(other_seed, 11)) != _ids(reference[:11])


# --------------------------------------------------------------------------- the trainer


def _cfg(data, init, out, **kw) -> DistillConfig:
    base = dict(
        data=str(data),
        init=str(init),
        out=str(out),
        steps=8,
        batch_size=16,
        lr=3e-3,
        warmup=2,
        ema=0.9,
        streams=2,
        shuffle_buffer=6,
        heldout_fraction=0.2,
        heldout_trajectories=16,
        checkpoint_every=4,
        eval_every=4,
        log_every=1,
        precision="fp32",
        device="cpu",
        num_workers=0,
    )
    base.update(kw)
    return DistillConfig(**base)


def test_a_few_steps_lower_the_loss_and_record_provenance(
    tmp_path, tiny_shaped_dataset, saved_tiny_teacher
):
    cfg = _cfg(tiny_shaped_dataset, saved_tiny_teacher, tmp_path / "run", steps=30)
    src = open_trajectory_dataset(tiny_shaped_dataset)
    fixed = _take(TrajectoryLoader(src, cfg.loader_config()), 4)
    teacher = load_checkpoint(saved_tiny_teacher)
    before = StudentStep(build_student(teacher), cfg, torch.device("cpu"))
    res = train_student(cfg)
    student = load_checkpoint(res.final_dir, role="student")
    after = StudentStep(student.model, cfg, torch.device("cpu"))
    loss_before, loss_after = before.heldout_loss(fixed), after.heldout_loss(fixed)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    assert res.heldout_loss is not None and math.isfinite(res.heldout_loss)
    prov = student.config.provenance
    manifest = json.loads((tiny_shaped_dataset / "manifest.json").read_text())
    assert prov["student_steps"] == 4 and prov["times"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert prov["dataset"]["fingerprint"] == manifest["fingerprint"]
    assert prov["dataset"]["id"] == str(tiny_shaped_dataset.resolve())
    assert prov["teacher_identity"] == teacher.identity
    assert prov["compass_identity"] is not None and prov["init"]["identity"] == teacher.identity
    assert student.config.backbone.step_conditioning and student.config.role == "student"
    assert (res.final_dir / "language.json").is_file()
    metrics = [
        json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert all(m["examples_per_second"] > 0 for m in metrics)
    assert sum("heldout_loss" in m for m in metrics) == 8  # every 4 steps and the last


def test_resume_gives_the_same_next_loss(tmp_path, tiny_blind_dataset, saved_tiny_teacher):
    kw = dict(steps=8, grad_accum=2)  # 16 batches: crosses epochs (≈ 4 batches each)
    full = train_student(_cfg(tiny_blind_dataset, saved_tiny_teacher, tmp_path / "full", **kw))

    class Stop(Exception):
        pass

    def stop_at_6(step, total, metrics):
        if step == 6:  # after step 6, whose checkpoint does not exist: resume from step 4
            raise Stop

    half = _cfg(tiny_blind_dataset, saved_tiny_teacher, tmp_path / "resumed", **kw)
    with pytest.raises(Stop):
        train_student(half, progress=stop_at_6)
    resumed = train_student(half)
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[4:]]
    assert resumed.identity == full.identity
    a = load_file(str(tmp_path / "full/checkpoints/step-0000008/trainer_state.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step-0000008/trainer_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 9))  # lines after the step-4 checkpoint were rewritten once
    with pytest.raises(ConfigError, match=r"different config \(changed: lr\)"):
        train_student(
            _cfg(tiny_blind_dataset, saved_tiny_teacher, tmp_path / "full", **kw, lr=0.01)
        )


def test_resume_from_continues_a_run_in_a_new_folder(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher
):
    data, init = tiny_blind_dataset, saved_tiny_teacher
    full = train_student(_cfg(data, init, tmp_path / "full"))

    class Stop(Exception):
        pass

    def stop_at_6(step, total, metrics):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):  # a run stopped after step 6; its newest checkpoint is step 4
        train_student(_cfg(data, init, tmp_path / "stopped"), progress=stop_at_6)
    # continued in a new folder: weights, optimizer moments, EMA, generator, data position
    cont = train_student(_cfg(data, init, tmp_path / "cont", resume_from=str(tmp_path / "stopped")))
    assert [h["step"] for h in cont.history] == [5, 6, 7, 8]
    assert [h["loss"] for h in cont.history] == [h["loss"] for h in full.history[4:]]
    assert cont.identity != full.identity  # the same weights; the provenance names the origin
    a = load_file(str(tmp_path / "full/checkpoints/step-0000008/trainer_state.safetensors"))
    b = load_file(str(tmp_path / "cont/checkpoints/step-0000008/trainer_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = json.loads((tmp_path / "cont/final/config.json").read_text())
    assert final["provenance"]["continues"] == str(tmp_path / "stopped")

    # a finished run, extended by 4 steps: AdamW's moments go on from step 8
    more = _cfg(data, init, tmp_path / "more", steps=12, resume_from=str(tmp_path / "full"))
    res = train_student(more)
    assert [h["step"] for h in res.history] == [9, 10, 11, 12]
    meta = json.loads((tmp_path / "more/checkpoints/step-0000012/trainer_state.json").read_text())
    adam_steps = {slot["step"] for slot in meta["optimizer"]["state"].values()}
    assert adam_steps == {"__tensor__"}
    c = load_file(str(tmp_path / "more/checkpoints/step-0000012/trainer_state.safetensors"))
    assert {float(v) for k, v in c.items() if k.endswith("/step")} == {12.0}
    assert train_student(more).history == []  # rerunning resumes the new folder itself

    with pytest.raises(ConfigError, match=r"is at step 8; continuing it needs more steps"):
        train_student(_cfg(data, init, tmp_path / "x", resume_from=str(tmp_path / "full")))
    assert not (tmp_path / "x/run_config.json").exists()  # refused before it is recorded
    assert not (tmp_path / "x/run.lock").exists()  # and the folder is not left locked
    with pytest.raises(ConfigError, match=r"that run differs in lr; a run continues"):
        train_student(
            _cfg(data, init, tmp_path / "y", steps=12, lr=0.01, resume_from=str(tmp_path / "full"))
        )
    with pytest.raises(ConfigError, match=r"is --out itself"):
        _cfg(data, init, tmp_path / "full", resume_from=str(tmp_path / "full"))
    with pytest.raises(CheckpointError, match=r"not a distill run folder"):
        train_student(_cfg(data, init, tmp_path / "z", resume_from=str(tmp_path)))


def test_no_draw_uses_or_moves_the_global_rng(tmp_path, tiny_blind_dataset, saved_tiny_teacher):
    """Training is a function of the run alone: another global torch seed before it gives the
    same trainer state bit for bit, and the caller's global RNG state is left as it was."""
    states = []
    for global_seed in (0, 12345):
        out = tmp_path / f"global-{global_seed}"
        cfg = _cfg(tiny_blind_dataset, saved_tiny_teacher, out, steps=2, eval_every=2)
        run = prepare_run(cfg)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        train_student(run)
        assert torch.equal(torch.get_rng_state(), before)
        states.append(load_file(str(out / "checkpoints/step-0000002/trainer_state.safetensors")))
    a, b = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((out / "checkpoints/step-0000002/trainer_state.json").read_text())
    assert [g["weight_decay"] for g in meta["optimizer"]["param_groups"]] == [0.03, 0.0]


# --------------------------------------------------------------------------- bad input


def _rewrite_shard(root, transform, shards=None):
    """Rewrite shards (default: all) of a copied dataset with transform(table, meta), and
    re-record their size and sha256 in its manifest (as a build of that content would)."""
    import hashlib

    files = sorted((root / "data").glob("*.parquet"))
    manifest = json.loads((root / "manifest.json").read_text())
    for f in files if shards is None else [files[i] for i in shards]:
        pf = pq.ParquetFile(f)
        meta = json.loads(pf.metadata.metadata[b"tsdfm"])
        table, meta = transform(pf.read().replace_schema_metadata(None), meta)
        pq.write_table(table.replace_schema_metadata({"tsdfm": json.dumps(meta)}), f)
        entry = manifest["shards"][f.name[len("train-") : len("train-00000")]]
        entry["bytes"], entry["sha256"] = (
            f.stat().st_size,
            hashlib.sha256(f.read_bytes()).hexdigest(),
        )
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_missing_column_and_unknown_schema_version(tmp_path, tiny_blind_dataset):
    no_energies = shutil.copytree(tiny_blind_dataset, tmp_path / "a")
    _rewrite_shard(no_energies, lambda t, m: (t.drop_columns(["energies"]), m))
    with pytest.raises(DataError, match=r"lacks the column\(s\) energies of the trajectory"):
        open_trajectory_dataset(no_energies)
    future = shutil.copytree(tiny_blind_dataset, tmp_path / "b")
    _rewrite_shard(future, lambda t, m: (t, {**m, "schema_version": 99}))
    with pytest.raises(DataError, match="uses trajectory schema v99, but this tsdfm-pipeline"):
        open_trajectory_dataset(future)


def test_a_shard_of_another_build_is_refused_while_reading(tmp_path, tiny_blind_dataset):
    mixed = shutil.copytree(tiny_blind_dataset, tmp_path / "mixed")
    _rewrite_shard(mixed, lambda t, m: (t, {**m, "fingerprint": "sha256:other"}), shards=[2])
    loader = TrajectoryLoader(open_trajectory_dataset(mixed), LOADER)
    with pytest.raises(DataError, match="shards of different builds are mixed"):
        _take(loader, 30)


def test_unreadable_revision(monkeypatch, tiny_blind_dataset):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def fake_hub(path, revision=None, **kwargs):  # what datasets 5 raises, without a network
        if revision == "v9":
            raise DatasetNotFoundError(f"Revision '{revision}' doesn't exist for dataset '{path}'")
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset_builder", fake_hub)
    with pytest.raises(DataError, match=r"revision 'v9' of the Hub dataset org/traj cannot be"):
        open_trajectory_dataset("org/traj@v9")
    with pytest.raises(DataError, match=r"org/traj@v1 cannot be read \(ConnectionError: Could"):
        open_trajectory_dataset("org/traj@v1")
    with pytest.raises(DataError, match="a local folder has no revisions"):
        open_trajectory_dataset(f"{tiny_blind_dataset}@v1")


def test_step_count_mismatch_needs_the_flag(tmp_path, tiny_blind_dataset, saved_tiny_teacher):
    cfg = _cfg(tiny_blind_dataset, saved_tiny_teacher, tmp_path / "a", student_steps=8, steps=1)
    with pytest.raises(ConfigError, match=r"S=8 steps, but dataset .* grid of S=4.*--allow-step"):
        train_student(cfg)
    cfg = _cfg(
        tiny_blind_dataset,
        saved_tiny_teacher,
        tmp_path / "b",
        student_steps=8,
        allow_step_mismatch=True,
        steps=1,
    )
    with pytest.warns(DistillWarning, match="S=8 steps, but dataset"):
        res = train_student(cfg)
    assert load_checkpoint(res.final_dir).config.provenance["student_steps"] == 8


def _other_teacher(tmp_path, vocab_size: int, seed: int = 5):
    from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage
    from tsdfm.models.flow_model import FlowModel, teacher_config
    from tsdfm.models.train.common import seeded

    lang = SyntheticLanguage.generate(
        LanguageConfig(vocab_size=vocab_size, num_states=4, branching=3, seq_len=8, seed=3)
    )
    cfg = teacher_config(vocab_size, 8, d_model=32, n_layers=2, n_heads=2)
    with seeded(seed):
        model = FlowModel(cfg)
    d = tmp_path / f"teacher-{vocab_size}-{seed}"
    save_checkpoint(d, model, lang.tokenizer())
    return d


def test_vocabulary_mismatch_and_teacher_mismatch(tmp_path, tiny_blind_dataset):
    for vocab in (16, 10):  # [MASK] is 16 (dataset: 12), or ids up to 12 exceed 10 + [MASK]
        cfg = _cfg(tiny_blind_dataset, _other_teacher(tmp_path, vocab), tmp_path / "run")
        with pytest.raises(CheckpointError, match="the vocabularies differ"):
            train_student(cfg)
    same_vocab = _other_teacher(tmp_path, 12)
    cfg = _cfg(tiny_blind_dataset, same_vocab, tmp_path / "run", steps=1)
    with pytest.warns(DistillWarning, match="was built with teacher sha256:"):
        train_student(cfg)


def test_cli_reports_bad_input_in_one_line(tmp_path, tiny_blind_dataset, saved_tiny_teacher):
    from tsdfm.pipeline.cli import app

    future = shutil.copytree(tiny_blind_dataset, tmp_path / "future")
    _rewrite_shard(future, lambda t, m: (t, {**m, "schema_version": 99}))
    res = CliRunner().invoke(
        app,
        ["distill", "--data", str(future), "--init", str(saved_tiny_teacher), "--out", "x"],
    )
    assert res.exit_code == 2
    assert res.output.startswith("error: shard ") and "schema v99" in res.output
    assert len(res.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- CLI without Ray


def test_distill_sample_and_eval_run_without_ray(tmp_path, tiny_blind_dataset, saved_tiny_teacher):
    out = tmp_path / "run"
    code = f"""
import json, sys
from typer.testing import CliRunner
from tsdfm.pipeline.cli import app
r = CliRunner()
res = r.invoke(app, ["distill", "--data", {str(tiny_blind_dataset)!r}, "--init",
    {str(saved_tiny_teacher)!r}, "--out", {str(out)!r}, "--steps", "3", "--batch-size", "8",
    "--streams", "2", "--num-workers", "0", "--heldout-fraction", "0.2", "--eval-samples", "16",
    "--device", "cpu"])
assert res.exit_code == 0, res.output
assert "student steps S=4" in res.output and "final eval (16 samples, 4 steps)" in res.output
res = r.invoke(app, ["sample", "--model", {str(out / "final")!r}, "-n", "3",
    "--out", {str(tmp_path / "s.jsonl")!r}])
assert res.exit_code == 0, res.output
assert "3 samples, 4 steps" in res.output and "[2] " in res.output
res = r.invoke(app, ["eval", "--model", {str(out / "final")!r}, "--steps", "4",
    "--samples", "4"])
assert res.exit_code == 0, res.output
assert 'ray' not in sys.modules, 'distill, sample or eval imported ray'
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["tokens"]) == 8 and r["steps"] == 4 for r in rows)
    assert all(len(r["text"].split()) == 8 for r in rows)  # synthetic words, one per token
