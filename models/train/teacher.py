"""Teacher pretraining: fit p_θ(x_1 | x_t) on the mixture path.

Each step draws x_1 from the data, t ~ U[0, 1], x_t ~ p_t(· | x_1) along the path, and minimises
the cross-entropy on x_1 (or the generalized KL, see ``tsdfm.models.losses``). All randomness comes
from one explicit ``torch.Generator`` whose state is checkpointed, so a resumed run is exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tsdfm.models.checkpoint import save_checkpoint
from tsdfm.models.data.sources import DataSource, SyntheticSource
from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage
from tsdfm.models.errors import ConfigError
from tsdfm.models.flow_model import FlowModel, teacher_config
from tsdfm.models.losses import cross_entropy_loss, generalized_kl_loss
from tsdfm.models.train.common import (
    EMA,
    MetricsLog,
    check_run_config,
    checkpoint_dir,
    due,
    get_lr,
    optimizer_step,
    resume_latest,
    save_step_state,
    seeded,
)


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Teacher pretraining run.

    Args:
        out: run directory (checkpoints/, final/, metrics.jsonl, eval.json).
        language: synthetic language config (used when no corpus source is passed).
        source, scheduler: the probability path.
        d_model, n_layers, n_heads: backbone size.
        loss: "ce" (cross-entropy on x_1) or "gkl" (generalized KL).
        steps, batch_size, lr, warmup, weight_decay, grad_clip, ema: optimisation.
        checkpoint_every: steps between resumable checkpoints (the last 2 are kept).
        eval_every: steps between held-out loss evaluations.
        seed: seed of the run's generator.
    """

    out: str
    language: LanguageConfig = field(default_factory=LanguageConfig)
    source: str = "mask"
    scheduler: str = "linear"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    loss: str = "ce"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1.5e-3
    warmup: int = 200
    weight_decay: float = 0.03
    grad_clip: float = 1.0
    ema: float = 0.999
    checkpoint_every: int = 250
    eval_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.loss not in ("ce", "gkl"):
            raise ConfigError(f"unknown loss {self.loss!r}; use 'ce' or 'gkl'")
        if not self.lr > 0 or self.warmup < 0 or not 0 <= self.ema < 1:
            raise ConfigError("lr must be > 0, warmup >= 0 and ema in [0, 1)")


@dataclass
class TrainResult:
    final_dir: Path
    identity: str
    steps: int
    final_loss: float
    heldout_loss: float
    history: list[dict]


def _loss_fn(cfg: TeacherTrainConfig, path):
    if cfg.loss == "ce":
        return lambda logits, ps: cross_entropy_loss(logits, ps.x_1, ps.x_t, path)
    return lambda logits, ps: generalized_kl_loss(logits, ps.x_1, ps.x_t, ps.t, path)


def train_teacher(
    cfg: TeacherTrainConfig,
    data: DataSource | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> TrainResult:
    """Train (or resume) a teacher; returns where the final checkpoint is.

    Args:
        cfg: the run.
        data: data source; defaults to the synthetic language of ``cfg.language``.
        progress: called as progress(step, total, metrics) after every step.
    """
    data = data if data is not None else SyntheticSource(SyntheticLanguage.generate(cfg.language))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_config(out, {"run": _jsonable(cfg), "data": data.describe()})
    mcfg = teacher_config(
        data.vocab_size,
        data.seq_len,
        cfg.source,
        cfg.scheduler,
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        data=data.describe(),
        special_tokens=_special_tokens(data),
    )
    with seeded(cfg.seed):
        model = FlowModel(mcfg)
    path = mcfg.path()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    state = resume_latest(out, model, opt, ema)
    if state is not None:
        gen.set_state(state.generators["data"])
        start = state.step
    heldout_gen = torch.Generator().manual_seed(cfg.seed + 7919)
    heldout = [data.heldout(cfg.batch_size, heldout_gen) for _ in range(4)]
    loss_fn = _loss_fn(cfg, path)
    last = {"loss": float("nan")}
    t0 = time.perf_counter()
    model.train()
    with MetricsLog(out, resume_step=start) as log:
        for step in range(start, cfg.steps):
            lr = get_lr(step, cfg.lr, cfg.warmup, cfg.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            x_1 = data.batch(cfg.batch_size, gen)
            t = torch.rand(cfg.batch_size, generator=gen)
            ps = path.sample(x_1, t, gen)
            loss = loss_fn(model(ps.x_t, t), ps)
            gnorm = optimizer_step(model, opt, loss, cfg.grad_clip, ema)
            last = {
                "step": step + 1,
                "loss": loss.item(),
                "lr": lr,
                "grad_norm": gnorm,
                "seconds": time.perf_counter() - t0,
            }
            if due(step + 1, cfg.eval_every, cfg.steps):
                last["heldout_loss"] = _heldout_loss(model, ema, heldout, path, loss_fn, cfg.seed)
                log.write(last)
            if progress is not None:
                progress(step + 1, cfg.steps, last)
            if due(step + 1, cfg.checkpoint_every, cfg.steps):
                _save_step(out, step + 1, model, opt, ema, gen, data)
    final = out / "final"
    with ema.applied(model) if ema is not None else nullcontext():
        model.config = model.config.replace(
            provenance={"trainer": "teacher", "steps": cfg.steps, "run_config": _jsonable(cfg)}
        )
        ident = save_checkpoint(final, model.eval(), data.tokenizer(), data.checkpoint_files())
    heldout_loss = _heldout_loss(model, ema, heldout, path, loss_fn, cfg.seed)
    return TrainResult(final, ident, cfg.steps, last["loss"], heldout_loss, log.history)


def _special_tokens(data: DataSource) -> dict:
    eos = data.describe().get("eos_token_id")
    return {} if eos is None else {"eos": eos}


def _jsonable(cfg: TeacherTrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("out")
    return d


@torch.no_grad()
def _heldout_loss(model, ema, batches, path, loss_fn, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed + 104729)
    was_training = model.training
    model.eval()
    total = 0.0
    with ema.applied(model) if ema is not None else nullcontext():
        for x_1 in batches:
            t = torch.rand(x_1.shape[0], generator=gen)
            ps = path.sample(x_1, t, gen)
            total += loss_fn(model(ps.x_t, t), ps).item()
    model.train(was_training)
    return total / len(batches)


def _save_step(out: Path, step: int, model, opt, ema, gen, data: DataSource) -> None:
    save_checkpoint(checkpoint_dir(out, step), model, data.tokenizer(), data.checkpoint_files())
    save_step_state(out, step, model, opt, ema, {"data": gen.get_state()})
