"""The one training loop of the four trainers (teacher, compass, LM, distill).

A trainer supplies a :class:`Task`: its model, the loss of one micro-batch, and hooks that
describe a step, evaluate, save the model files of a checkpoint and carry its own resumable
state (a data position). The loop owns everything else:

- **The update** (:class:`Updater`). Optimizer step n (0-based) with A micro-batches is

      g_n = ∇_θ (1/A) Σ_{a<A} ℓ_{n,a}(θ),   g_n ← g_n · min(1, c / ‖g_n‖),
      θ ← AdamW(θ, g_n; η_n, β = (0.9, 0.95), λ_group),   θ̄ ← d_n·θ̄ + (1 − d_n)·θ,

  with η_n = ``get_lr(n)`` (linear warmup, then cosine decay to η/10), c the clipping norm and
  θ̄ the EMA (:class:`tsdfm.models.train.common.EMA`). Weight decay λ applies to the weight
  matrices only, not to biases, norm gains, other vectors or embedding tables
  (:func:`param_groups`).
- **Randomness.** One explicit ``torch.Generator`` per run, seeded with the run seed and
  checkpointed; the task draws its batches and noise from it. Draws that cannot take a
  generator (dropout inside a model) run under a global RNG that the loop re-seeds for every
  micro-batch from (seed, micro-batch index) and restores afterwards
  (:func:`pinned_global_rng`), so they too are a pure function of the run and the caller's
  global RNG is never touched.
- **Exact resume.** Model, optimizer moments, EMA, generator state, step and the task's own
  state are saved every ``checkpoint_every`` steps (the newest ``keep`` kept); a run stopped
  after step k and resumed continues bit for bit.
- **Metrics.** One JSON line per logged step in metrics.jsonl (every ``log_every`` steps and
  at every evaluation, every ``eval_every`` steps and after the last), the held-out metrics
  computed under the EMA weights in eval mode.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.train.common import (
    EMA,
    KEEP_CHECKPOINTS,
    MetricsLog,
    TrainerState,
    checkpoint_dir,
    due,
    get_lr,
    latest_checkpoint,
    load_trainer_state,
    resume_latest,
    rotate_checkpoints,
    save_step_state,
    save_trainer_state,
)
from tsdfm.models.train.distributed import (
    World,
    barrier,
    check_split,
    full_model_state,
    full_optimizer_state,
    full_tensor,
    load_full_state,
    reduce_sum,
    shard_like,
)

GENERATOR = "data"  # the name of the run's generator in the trainer state


@dataclass(frozen=True)
class OptimConfig:
    """How parameters are updated.

    Args:
        lr: peak learning rate η (reached after ``warmup`` steps).
        steps: total optimizer steps (the end of the cosine decay).
        warmup: steps of linear warmup.
        weight_decay: λ of AdamW's decoupled decay on the weight matrices.
        grad_clip: c, the largest gradient norm (larger gradients are scaled down to it).
        ema: decay of the EMA of the weights; 0 switches the EMA off.
        grad_accum: A, micro-batches per optimizer step.
        betas: AdamW's (β₁, β₂).
        min_lr_ratio: the learning rate at the end of the decay, as a share of η.
    """

    lr: float
    steps: int
    warmup: int
    weight_decay: float
    grad_clip: float
    ema: float = 0.0
    grad_accum: int = 1
    betas: tuple[float, float] = (0.9, 0.95)
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.warmup < 0 or self.weight_decay < 0:
            raise ConfigError("lr must be > 0, warmup and weight_decay >= 0")
        if not self.grad_clip > 0 or not 0 <= self.ema < 1:
            raise ConfigError("grad_clip must be > 0 and ema in [0, 1)")
        for name in ("steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")


def decays(module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """Whether weight decay applies to ``param`` of ``module``: to weight matrices only.

    Biases, norm gains and other vectors (every tensor with fewer than two axes longer than 1,
    such as a learned (1, d) constant) are offsets and scales, not maps, and are not decayed.
    Neither are embedding tables: a row is a token's vector and gets a gradient only where
    that token occurs, so decay would shrink the rows of rare tokens for not being seen.
    """
    if isinstance(module, torch.nn.Embedding):
        return False
    return sum(size > 1 for size in param.shape) >= 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: [weight matrices (decay λ), everything else (decay 0)], each
    in ``model.parameters()`` order; a parameter shared by several modules (tied weights)
    is listed once, under the first module that holds it."""
    owner: dict[int, bool] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owner.setdefault(id(param), decays(module, param))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if owner[id(p)]], "weight_decay": weight_decay},
        {"params": [p for p in params if not owner[id(p)]], "weight_decay": 0.0},
    ]


@contextmanager
def pinned_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's global generator (of the CPU, and of ``device`` when it is a
    CUDA device) seeded with ``seed``; restore the caller's states afterwards.

    For draws that cannot take an explicit generator (``F.dropout``, attention dropout):
    under this context they are a pure function of ``seed``.
    """
    cuda = device.type == "cuda"
    index = (
        (device.index if device.index is not None else torch.cuda.current_device())
        if cuda
        else None
    )
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


@contextmanager
def evaluating(model: torch.nn.Module, ema: EMA | None) -> Iterator[None]:
    """Eval mode, no gradients and the EMA weights (when there is an EMA) for a block; the
    training weights and mode come back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ema.applied(model) if ema is not None else nullcontext():
            yield
    finally:
        model.train(was_training)


class Updater:
    """Optimizer step n from A micro-batch losses (the first equation of the module
    docstring): AdamW over :func:`param_groups`, accumulation, clipping, EMA.

    Args:
        model: the model being trained (its parameters are updated in place).
        cfg: the optimisation.
        seed: run seed; micro-batch i of the run is computed under
            :func:`pinned_global_rng` with seed ``trajectory_seed(seed, i) mod 2^64``.
        world: the job (``tsdfm.models.train.distributed``): of the A micro-batches of a
            step, rank r computes those a ≡ r (mod W), A/W of them, and the gradients are
            averaged over the ranks by ``replica``.
        replica: the DDP wrapper of ``model`` when the job has several processes (its
            ``no_sync`` skips the all-reduce of all but a rank's last micro-batch).
        sharded: ``model`` is sharded over the job (FSDP2,
            ``tsdfm.models.train.distributed.shard_model``): its parameters, gradients,
            moments and EMA are this rank's slices; checkpoints gather them in full
            (:meth:`gathered`) and a resume cuts them again (:meth:`load_state`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: OptimConfig,
        seed: int = 0,
        world: World | None = None,
        replica: torch.nn.Module | None = None,
        sharded: bool = False,
    ):
        self.model, self.cfg, self.seed = model, cfg, seed
        self.world = world if world is not None else World()
        self.local_accum = check_split(self.world, cfg.grad_accum)
        self.replica = replica
        self.sharded = sharded
        self._full: Gathered | None = None
        self.opt = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas
        )
        self.ema = EMA(model, cfg.ema) if cfg.ema > 0 else None

    def lr(self, step: int) -> float:
        """η_n of optimizer step ``step`` (0-based)."""
        c = self.cfg
        return get_lr(step, c.lr, c.warmup, c.steps, c.min_lr_ratio)

    def __call__(self, step: int, micro_loss: Callable[[], torch.Tensor]) -> dict[str, float]:
        """Run optimizer step ``step`` (0-based) on ``grad_accum`` calls of ``micro_loss``.

        Args:
            step: n.
            micro_loss: the scalar loss ℓ_{n,a} of the next micro-batch (with its graph).

        Returns:
            loss (the mean of the A micro-batch losses), lr (η_n) and grad_norm (‖g_n‖ before
            clipping).
        """
        A, W, n = self.cfg.grad_accum, self.world.size, self.local_accum
        lr = self.lr(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        device = next(self.model.parameters()).device
        total = 0.0
        for a in range(n):
            i = self.world.rank + a * W  # the job's micro-batch index within the step
            seed = trajectory_seed(self.seed, step * A + i) % 2**64
            last = a == n - 1
            sync = self.replica.no_sync() if self.replica is not None and not last else None
            with pinned_global_rng(seed, device), sync or nullcontext():
                loss = micro_loss()
                (loss / n).backward()
            total += loss.item() / A
        if W > 1:
            total = reduce_sum(self.world, [total], device)[0]
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": total, "lr": lr, "grad_norm": float(full_tensor(gnorm))}

    @contextmanager
    def gathered(self, optimizer: bool = True) -> Iterator[Gathered | None]:
        """A block in which the full (unsharded) state is at hand on rank 0: the model's
        current weights, and with ``optimizer`` the AdamW state and the EMA. Every rank enters
        it (a sharded model gathers); it yields None when the model is not sharded (its own
        state dicts are the full ones) and on ranks other than 0."""
        if not self.sharded:
            yield None
            return
        model = full_model_state(self.model)
        opt = full_optimizer_state(self.model, self.opt) if optimizer else {}
        ema = None
        if optimizer and self.ema is not None:
            ema = {k: full_tensor(v) for k, v in self.ema.state_dict().items()}
        self._full = Gathered(model, opt, ema) if self.world.main else None
        try:
            yield self._full
        finally:
            self._full = None

    def saved_model(self) -> Any:
        """What a checkpoint's model files are written from (``save_checkpoint``'s model):
        the model, or inside :meth:`gathered` of a sharded model its full weights with the
        model's config."""
        if not self.sharded:
            return self.model
        assert self._full is not None, "a sharded model is saved inside Updater.gathered()"
        return FullModel(self.model.config, self._full.model)

    def load_state(self, state: Any) -> None:
        """Load a checkpoint's trainer state (full state dicts, read on every rank): model,
        AdamW state, EMA; a sharded model keeps this rank's slices."""
        if not self.sharded:
            self.model.load_state_dict(state.model)
            self.opt.load_state_dict(state.optimizer)
        else:
            load_full_state(self.model, self.opt, state.model, state.optimizer)
        if self.ema is not None and state.ema is not None:
            like = self.ema.state_dict()
            self.ema.load_state_dict({k: shard_like(v, like[k]) for k, v in state.ema.items()})


@dataclass
class Gathered:
    """The full state of a sharded run on rank 0: model weights, optimizer state (numbered as
    a one-process run numbers it), EMA (None without one)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    ema: dict[str, torch.Tensor] | None


class FullModel:
    """A model's config with its full weights: what ``save_checkpoint`` needs of a model."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class Task:
    """What a trainer gives the loop. Subclasses set ``model`` and implement :meth:`loss`
    and :meth:`save`; the other hooks default to doing nothing."""

    model: torch.nn.Module
    name: str = "train"  # the trainer, as trackers prefix its metrics

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        """The scalar loss of the next micro-batch of optimizer step ``step``, every random
        draw taken from ``gen`` (the run's generator)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The task's own metrics of the step just taken (added to the loop's step, loss, lr,
        grad_norm)."""
        return {}

    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics; the loop calls it under :func:`evaluating` (EMA weights)."""
        return {}

    def logged(self, line: dict[str, Any]) -> None:
        """Called after ``line`` was written to metrics.jsonl."""

    def save(self, directory: Path) -> None:
        """Write the model files of the checkpoint ``directory`` (the loop adds the trainer
        state beside them)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The task's resumable state besides the model (JSON-able), e.g. a data position."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass(frozen=True)
class LoopConfig:
    """The loop around the updates.

    Args:
        optim: the optimisation (its ``steps`` is the run's length).
        seed: seed of the run's generator and of :func:`pinned_global_rng`.
        checkpoint_every: steps between resumable checkpoints (and after the last step).
        eval_every: steps between held-out evaluations (and after the last step).
        log_every: steps between metrics lines; None = one line per evaluation only.
        keep: checkpoints kept (the newest).
        report_to: trackers that also get every metrics line
            (``tsdfm.models.train.trackers``; empty: metrics.jsonl only).
    """

    optim: OptimConfig
    seed: int
    checkpoint_every: int
    eval_every: int
    log_every: int | None = None
    keep: int = KEEP_CHECKPOINTS
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "eval_every", "log_every", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be a positive integer")

    @property
    def steps(self) -> int:
        return self.optim.steps


def optim_config(run: Any) -> OptimConfig:
    """The optimisation of a trainer's run config: its lr, steps, warmup, weight_decay,
    grad_clip and, where it has them, ema (else 0: no EMA) and grad_accum (else 1)."""
    return OptimConfig(
        lr=run.lr,
        steps=run.steps,
        warmup=run.warmup,
        weight_decay=run.weight_decay,
        grad_clip=run.grad_clip,
        ema=getattr(run, "ema", 0.0),
        grad_accum=getattr(run, "grad_accum", 1),
    )


def loop_config(run: Any) -> LoopConfig:
    """The loop of a trainer's run config: :func:`optim_config`, its seed, checkpoint_every,
    eval_every and, where it has them, log_every (else a line per evaluation) and report_to
    (else no tracker)."""
    return LoopConfig(
        optim_config(run),
        run.seed,
        run.checkpoint_every,
        run.eval_every,
        getattr(run, "log_every", None),
        report_to=tuple(getattr(run, "report_to", ()) or ()),
    )


@dataclass
class LoopResult:
    """What :meth:`TrainLoop.run` did in this session.

    Attributes:
        start: the step the session started from (0, or the resumed checkpoint's).
        last: the metrics of the last step taken (``{"loss": nan}`` when none was).
        history: the metrics lines written in this session.
    """

    start: int
    last: dict[str, Any] = field(default_factory=lambda: {"loss": math.nan})
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainLoop:
    """Train ``task.model`` for ``cfg.steps`` steps in the run folder ``out``, resuming from
    its newest checkpoint.

    Args:
        cfg: the loop.
        task: the trainer's part.
        out: the run folder (checkpoints/, metrics.jsonl).
        updater: the update rule; default ``Updater(task.model, cfg.optim, cfg.seed)``.
        tracker: where each metrics line also goes (an object with ``log(line)`` and
            ``close()``); default: the trackers of ``cfg.report_to``
            (``tsdfm.models.train.trackers.Trackers``, opened by :meth:`run` on rank 0,
            metrics named ``{task.name}/{field}``).
        store: the :class:`tsdfm.models.train.common.RunStore` whose staging folder ``out``
            is: every checkpoint is uploaded to it once written (None: ``out`` is the run).
        resume_from: another run folder whose newest checkpoint starts this run when ``out``
            has none yet (weights, optimizer moments, EMA, generator, task state): a finished
            run continued for more steps in a new folder.

    In a job of several processes (the updater's world) every rank runs the loop and only
    rank 0 writes: metrics.jsonl, the tracker, checkpoints. The task's hooks run on every
    rank (its :meth:`Task.state_dict` may gather from the others).
    """

    def __init__(
        self,
        cfg: LoopConfig,
        task: Task,
        out: Path,
        updater: Updater | None = None,
        tracker: Any = None,
        store: Any = None,
        resume_from: Path | None = None,
    ):
        self.cfg, self.task, self.out = cfg, task, Path(out)
        self.store = store
        self.resume_from = resume_from
        self.updater = updater if updater is not None else Updater(task.model, cfg.optim, cfg.seed)
        self.world = self.updater.world
        self.tracker = tracker
        self.gen = torch.Generator().manual_seed(cfg.seed)

    @property
    def ema(self) -> EMA | None:
        return self.updater.ema

    def averaged(self):
        """A context with the EMA weights in the model (nothing changes without an EMA)."""
        return self.ema.applied(self.task.model) if self.ema is not None else nullcontext()

    def evaluate(self) -> dict[str, Any]:
        """The task's held-out metrics under the EMA weights, in eval mode."""
        with evaluating(self.task.model, self.ema):
            return self.task.evaluate()

    def resume(self) -> int:
        """Load the newest complete checkpoint of the run (if any; else that of
        ``resume_from``); returns its step."""
        state = self._load(self.out)
        if state is None and self.resume_from is not None:
            state = self._load(self.resume_from)
            if state is None:
                raise CheckpointError(
                    f"{self.resume_from} holds no complete checkpoint to continue from; pass "
                    "the run folder of a distill run (it has checkpoints/step-*)"
                )
            if state.step >= self.cfg.steps:
                raise ConfigError(
                    f"{self.resume_from} is at step {state.step}; continuing it needs more "
                    f"steps than that (--train-steps > {state.step}, the new total)"
                )
        if state is None:
            return 0
        self.gen.set_state(state.generators[GENERATOR])
        self.task.load_state_dict(state.extra)
        return state.step

    def _load(self, run_dir: Path):
        """The newest complete checkpoint of ``run_dir`` loaded into model, optimizer and EMA
        (``resume_latest``; a sharded model cuts the full state into its slices)."""
        if not self.updater.sharded:
            return resume_latest(run_dir, self.task.model, self.updater.opt, self.ema)
        last = latest_checkpoint(run_dir)
        if last is None:
            return None
        state = load_trainer_state(last)
        saved = [len(g["params"]) for g in state.optimizer["param_groups"]]
        wanted = [len(g["params"]) for g in self.updater.opt.param_groups]
        if saved != wanted:
            raise CheckpointError(
                f"{last} holds optimizer state for parameter groups of {saved} tensors, this "
                f"trainer has groups of {wanted}; pass a new --out"
            )
        self.updater.load_state(state)
        return state

    def run(self, progress: Callable[[int, int, dict], None] | None = None) -> LoopResult:
        """Resume, then take the remaining steps.

        Args:
            progress: called as progress(step, total, metrics) after every step.
        """
        cfg, main = self.cfg, self.world.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        result = LoopResult(self.resume())
        t0 = time.perf_counter()
        metrics = MetricsLog(self.out, resume_step=result.start) if main else NullLog()
        opened = self.tracker is None and main and bool(cfg.report_to)
        if opened:
            self.tracker = self._open_trackers()
        try:
            with metrics as log:
                self._steps(result, log, t0, progress)
        finally:
            if opened:
                self.tracker.close()
                self.tracker = None
        result.history = log.history
        return result

    def _open_trackers(self):
        from tsdfm.models.train.common import RUN_CONFIG_FILE
        from tsdfm.models.train.trackers import Trackers

        record = self.out / RUN_CONFIG_FILE
        config = json.loads(record.read_text()) if record.exists() else {}
        return Trackers(self.cfg.report_to, self.out, getattr(self.task, "name", "train"), config)

    def _steps(self, result: LoopResult, log, t0: float, progress) -> None:
        cfg, task, main = self.cfg, self.task, self.world.main
        total = cfg.steps
        log_every = cfg.log_every if cfg.log_every is not None else cfg.eval_every
        for step in range(result.start, total):
            m = self.updater(step, lambda step=step: task.loss(step, self.gen))
            line = {"step": step + 1, **m, **task.describe()}
            line["seconds"] = time.perf_counter() - t0
            evaluated = due(step + 1, cfg.eval_every, total)
            if evaluated:
                line.update(self.evaluate())
            if evaluated or (step + 1) % log_every == 0:
                log.write(line)
                if main and self.tracker is not None:
                    self.tracker.log(line)
                task.logged(line)
            result.last = line
            if progress is not None:
                progress(step + 1, total, line)
            if due(step + 1, cfg.checkpoint_every, total):
                self.save(step + 1)

    def save(self, step: int) -> None:
        """The checkpoint after ``step`` steps: the task's model files, then the trainer state
        (written last, so a checkpoint counts only once it is complete), then rotation; by
        rank 0, the other ranks waiting for it."""
        extra = self.task.state_dict()  # on every rank: it may gather the ranks' positions
        with self.updater.gathered() as full:  # on every rank: a sharded model gathers
            if self.world.main:
                self.task.save(checkpoint_dir(self.out, step))
                gens = {GENERATOR: self.gen.get_state()}
                if full is None:
                    save_step_state(
                        self.out,
                        step,
                        self.task.model,
                        self.updater.opt,
                        self.ema,
                        gens,
                        extra,
                        keep=self.cfg.keep,
                    )
                else:
                    directory = checkpoint_dir(self.out, step)
                    directory.mkdir(parents=True, exist_ok=True)
                    state = TrainerState(step, full.model, full.optimizer, full.ema, gens, extra)
                    save_trainer_state(directory, state)
                    rotate_checkpoints(self.out, self.cfg.keep)
                if self.store is not None:
                    self.store.push_checkpoint(step)
        barrier(self.world)


class NullLog:
    """The metrics log of a rank that does not write (ranks other than 0)."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def __enter__(self) -> NullLog:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(self, metrics: dict) -> None:
        self.history.append(metrics)
