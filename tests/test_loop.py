"""The training loop the four trainers share: parameter groups, accumulation, clipping, the
explicit generator and the pinned global RNG, exact resume (with dropout), rotation, metrics."""

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.flow_model import FlowModel, teacher_config
from tsdfm.models.train.common import seeded
from tsdfm.models.train.loop import (
    LoopConfig,
    OptimConfig,
    Task,
    TrainLoop,
    Updater,
    param_groups,
    pinned_global_rng,
)

OPTIM = OptimConfig(lr=1e-2, steps=8, warmup=2, weight_decay=0.1, grad_clip=1.0, ema=0.9)


class Net(torch.nn.Module):
    """Embedding → LayerNorm → dropout → Linear, a learned (1, d) offset, a tied output."""

    def __init__(self, vocab: int = 7, d: int = 5, dropout: float = 0.0):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.LayerNorm(d)
        self.lin = torch.nn.Linear(d, d)
        self.offset = torch.nn.Parameter(torch.zeros(1, d))
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.tok(x))
        z = torch.nn.functional.dropout(self.lin(z), self.dropout, self.training)
        return self.head(z + self.offset)


def _net(seed: int = 0, **kw) -> Net:
    with seeded(seed):
        return Net(**kw)


class NetTask(Task):
    """Next-token cross-entropy on random sequences drawn from the run's generator; the
    checkpoint's model files are the weights as safetensors."""

    def __init__(self, model: Net, batch: int = 8):
        self.model, self.batch = model, batch
        self.draws = 0

    def loss(self, step, gen):
        self.draws += 1
        x = torch.randint(0, 7, (self.batch, 6), generator=gen)
        logits = self.model(x[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 7), x[:, 1:].reshape(-1))

    def describe(self):
        return {"draws": self.draws}

    def evaluate(self):
        x = torch.arange(12).remainder(7).view(2, 6)
        logits = self.model(x[:, :-1])
        return {"heldout_loss": torch.nn.functional.cross_entropy(
            logits.reshape(-1, 7), x[:, 1:].reshape(-1)
        ).item()}  # fmt: skip

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.clone() for k, v in self.model.state_dict().items()},
                  str(directory / "model.safetensors"))  # fmt: skip

    def state_dict(self):
        return {"draws": self.draws}

    def load_state_dict(self, state):
        self.draws = state["draws"]


def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# --------------------------------------------------------------------------- parameter groups
def test_only_weight_matrices_are_decayed():
    model = _net()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay) == {"lin.weight"}
    # biases, the norm's gain and shift, the (1, d) offset, and the (tied) embedding table
    assert _names(model, no_decay) == {"tok.weight", "norm.weight", "norm.bias", "lin.bias",
                                       "offset"}  # fmt: skip
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flow_model_groups_cover_every_parameter_once():
    with seeded(0):
        model = FlowModel(teacher_config(12, 8, d_model=16, n_layers=1, n_heads=2))
    decay, no_decay = param_groups(model, 0.03)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    for name, p in model.named_parameters():
        in_decay = id(p) in {id(q) for q in decay["params"]}
        assert in_decay == (p.dim() >= 2 and min(p.shape) > 1 and "tok." not in name), name


def test_decay_shrinks_weight_matrices_and_leaves_vectors_alone():
    """With a zero gradient AdamW's step is the decoupled decay alone: θ ← (1 − ηλ)·θ."""
    model = _net()
    for p in model.parameters():
        torch.nn.init.normal_(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(lr=0.5, steps=1, warmup=0, weight_decay=0.2, grad_clip=1.0)
    upd = Updater(model, cfg)
    lr = upd.lr(0)
    upd(0, lambda: 0.0 * sum(p.sum() for p in model.parameters()))
    for name, p in model.named_parameters():
        want = before[name] * (1 - lr * 0.2) if name == "lin.weight" else before[name]
        assert torch.allclose(p, want, rtol=0, atol=1e-7), name


# --------------------------------------------------------------------------- the update
def test_accumulated_micro_batches_give_the_full_batch_gradient():
    """(1/A) Σ_a ∇ mean(ℓ over micro-batch a) = ∇ mean(ℓ over the A equal micro-batches)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 7, (8, 6), generator=gen)

    def ce(model, rows):
        logits = model(rows[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 7), rows[:, 1:].reshape(-1))

    cfg = OptimConfig(lr=1e-3, steps=1, warmup=0, weight_decay=0.0, grad_clip=1e6)
    one, four = _net(), _net()
    Updater(one, cfg)(0, lambda: ce(one, x))
    parts = iter(x.chunk(4))
    m = Updater(four, OptimConfig(**{**cfg.__dict__, "grad_accum": 4}))(
        0, lambda: ce(four, next(parts))
    )
    for (name, p), q in zip(one.named_parameters(), four.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    assert m["loss"] == pytest.approx(ce(_net(), x).item(), rel=1e-6)


def test_the_gradient_is_clipped_and_its_norm_before_clipping_reported():
    model = _net()
    cfg = OptimConfig(lr=1e-3, steps=1, warmup=0, weight_decay=0.0, grad_clip=0.01)
    m = Updater(model, cfg)(0, lambda: 100.0 * model(torch.arange(5).view(1, 5)).square().mean())
    after = math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters()))
    assert m["grad_norm"] > 1.0 and after == pytest.approx(0.01, rel=1e-4)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    upd = Updater(_net(), OPTIM)
    lrs = [upd.lr(n) for n in range(OPTIM.steps + 1)]
    assert lrs[:2] == [5e-3, 1e-2] and lrs[-1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_bad_optimisation_is_refused():
    with pytest.raises(ConfigError, match="grad_accum=0 must be a positive integer"):
        OptimConfig(lr=1e-3, steps=4, warmup=0, weight_decay=0.0, grad_clip=1.0, grad_accum=0)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        OptimConfig(lr=0.0, steps=4, warmup=0, weight_decay=0.0, grad_clip=1.0)


# --------------------------------------------------------------------------- randomness
def test_pinned_global_rng_is_a_function_of_the_seed_and_restores_the_caller():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with pinned_global_rng(7, torch.device("cpu")):
        a = torch.rand(4)
    with pinned_global_rng(7, torch.device("cpu")):
        b = torch.rand(4)
    with pinned_global_rng(8, torch.device("cpu")):
        c = torch.rand(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_dropout_steps_do_not_depend_on_or_touch_the_global_rng():
    def train(global_seed):
        torch.manual_seed(global_seed)
        model = _net(dropout=0.5)
        upd = Updater(model, OPTIM, seed=4)
        gen = torch.Generator().manual_seed(4)
        state = torch.get_rng_state()
        task = NetTask(model)
        for n in range(3):
            upd(n, lambda n=n: task.loss(n, gen))
        assert torch.equal(torch.get_rng_state(), state)
        return [p.detach().clone() for p in model.parameters()]

    a, b = train(0), train(99)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


# --------------------------------------------------------------------------- the loop
def _loop(out, task, **kw):
    base = dict(optim=OPTIM, seed=5, checkpoint_every=3, eval_every=4, log_every=None)
    base.update(kw)
    return TrainLoop(LoopConfig(**base), task, out)


def test_resume_is_exact_with_dropout_and_task_state(tmp_path):
    full_task = NetTask(_net(dropout=0.3))
    full = _loop(tmp_path / "full", full_task, log_every=1).run()

    class Stop(Exception):
        pass

    def stop_at_5(step, total, metrics):
        if step == 5:  # the step-3 checkpoint is the newest: steps 4 and 5 are redone
            raise Stop

    with pytest.raises(Stop):
        _loop(tmp_path / "resumed", NetTask(_net(dropout=0.3)), log_every=1).run(stop_at_5)
    task = NetTask(_net(dropout=0.3))
    resumed = _loop(tmp_path / "resumed", task, log_every=1).run()
    assert resumed.start == 3 and [m["step"] for m in resumed.history] == [4, 5, 6, 7, 8]
    assert [m["loss"] for m in resumed.history] == [m["loss"] for m in full.history[3:]]
    assert task.draws == full_task.draws == 8  # the task's own state came back
    for name in ("trainer_state.safetensors", "model.safetensors"):
        a = load_file(str(tmp_path / "full/checkpoints/step-0000008" / name))
        b = load_file(str(tmp_path / "resumed/checkpoints/step-0000008" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    lines = (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))


def test_lines_evaluations_and_kept_checkpoints(tmp_path):
    res = _loop(tmp_path, NetTask(_net()), log_every=3, keep=3, checkpoint_every=2).run()
    # a line every 3 steps and at every evaluation (every 4 steps and the last)
    assert [m["step"] for m in res.history] == [3, 4, 6, 8]
    assert [("heldout_loss" in m) for m in res.history] == [False, True, False, True]
    assert all(m["draws"] == m["step"] for m in res.history)
    assert list(res.history[0])[:4] == ["step", "loss", "lr", "grad_norm"]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-0000004", "step-0000006", "step-0000008"]


def test_evaluation_uses_the_ema_weights_and_restores_the_training_ones(tmp_path):
    task = NetTask(_net())
    loop = _loop(tmp_path, task)
    loop.run()
    live = {k: v.clone() for k, v in task.model.state_dict().items()}
    with loop.averaged():
        ema_loss = task.evaluate()["heldout_loss"]
    assert loop.evaluate()["heldout_loss"] == ema_loss != task.evaluate()["heldout_loss"]
    assert task.model.training
    assert all(torch.equal(v, task.model.state_dict()[k]) for k, v in live.items())


def test_a_checkpoint_with_other_parameter_groups_is_refused_in_one_line(tmp_path):
    from tsdfm.models.train.common import save_step_state

    model = _net()
    single = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the old single group
    model(torch.arange(5).view(1, 5)).sum().backward()
    single.step()
    save_step_state(tmp_path, 3, model, single, None, {"data": torch.Generator().get_state()})
    with pytest.raises(
        CheckpointError,
        match=r"parameter groups of \[6\] tensors, this trainer has groups of \[1, 5\]",
    ):
        _loop(tmp_path, NetTask(_net())).run()


# --------------------------------------------------------------------------- trackers
def test_report_to_names_and_refusals():
    from tsdfm.models.train.trackers import parse_report_to

    assert parse_report_to("none") == parse_report_to("") == parse_report_to(None) == ()
    assert parse_report_to("TensorBoard, wandb,tensorboard") == ("tensorboard", "wandb")
    assert parse_report_to(("trackio",)) == ("trackio",)
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'; use none or a comma list"):
        parse_report_to("tensorboard,mlflow")
    with pytest.raises(ConfigError, match="unknown tracker 'none'"):
        parse_report_to("none,wandb")


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "trackio"])
def test_a_missing_tracker_is_one_line_naming_the_install(tmp_path, tracker):
    import importlib.util

    from typer.testing import CliRunner

    from tsdfm.models.train.teacher import TeacherTrainConfig
    from tsdfm.pipeline.cli import app

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    want = f"--report-to {tracker} needs the {tracker} package, which is not installed: pip"
    with pytest.raises(ConfigError, match=want):
        TeacherTrainConfig(out=str(tmp_path), report_to=tracker)
    res = CliRunner().invoke(
        app, ["teacher", "train", "--out", str(tmp_path / "t"), "--report-to", f"none,{tracker}"]
    )
    assert res.exit_code == 2 and "unknown tracker 'none'" in res.output
    res = CliRunner().invoke(
        app, ["teacher", "train", "--out", str(tmp_path / "t"), "--report-to", tracker]
    )
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and want in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()  # refused before anything is written
    from tsdfm.models.train.compass import CompassTrainConfig

    with pytest.raises(ConfigError, match=want):
        CompassTrainConfig(out=str(tmp_path), report_to=tracker)
    res = CliRunner().invoke(
        app, ["compass", "train", "--out", str(tmp_path / "c"), "--report-to", tracker]
    )
    assert res.exit_code == 2 and want in res.output and not (tmp_path / "c").exists()


class Recorder:
    """A tracker that keeps what it is sent (the loop's ``tracker`` interface)."""

    def __init__(self):
        self.lines, self.closed = [], False

    def log(self, line):
        self.lines.append(dict(line))

    def close(self):
        self.closed = True


def test_metrics_jsonl_is_written_with_or_without_trackers(tmp_path):
    plain = _loop(tmp_path / "none", NetTask(_net()), log_every=2).run()
    lines = (tmp_path / "none/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6, 8]
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == [
        "checkpoints",
        "metrics.jsonl",
    ]
    recorder = Recorder()
    loop = TrainLoop(
        LoopConfig(OPTIM, 5, 3, 4, 2), NetTask(_net()), tmp_path / "rec", tracker=recorder
    )
    res = loop.run()
    assert [m["step"] for m in recorder.lines] == [2, 4, 6, 8]
    assert [m["loss"] for m in recorder.lines] == [m["loss"] for m in plain.history]
    assert res.history == recorder.lines and not recorder.closed  # the caller's to close


def test_tensorboard_gets_every_logged_line(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoopConfig(OPTIM, 0, 4, 4, 2, report_to=("tensorboard",))
    res = TrainLoop(cfg, NetTask(_net()), tmp_path).run()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6, 8]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in res.history], rel=1e-6)
    assert (tmp_path / "metrics.jsonl").exists()
