"""Teacher pretraining: fit p_θ(x_1 | x_t) on the mixture path.

Each step draws x_1 from the data, t ~ U[0, 1], x_t ~ p_t(· | x_1) along the path, and minimises
the cross-entropy on x_1 (or the generalized KL, see ``tsdfm.models.losses``). The loop, the
optimisation and the run folder are ``tsdfm.models.train.loop``'s: every draw comes from its
explicit, checkpointed ``torch.Generator``, so a resumed run is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tsdfm.models.checkpoint import save_checkpoint
from tsdfm.models.data.sources import DataSource, SyntheticSource
from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage
from tsdfm.models.errors import ConfigError
from tsdfm.models.flow_model import FlowModel, teacher_config
from tsdfm.models.losses import cross_entropy_loss, generalized_kl_loss
from tsdfm.models.path import MixturePath
from tsdfm.models.train.common import check_run_config, seeded
from tsdfm.models.train.loop import Task, TrainLoop, loop_config
from tsdfm.models.train.trackers import check_available, parse_report_to


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
        report_to: trackers that also get the metrics (``tsdfm.models.train.trackers``; not
            part of the run's identity).
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
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        check_available(self.report_to)
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


def _loss_fn(loss: str, path: MixturePath):
    """ℓ(logits, path sample) of the run's loss name ("ce" or "gkl")."""
    if loss == "ce":
        return lambda logits, ps: cross_entropy_loss(logits, ps.x_1, ps.x_t, path)
    return lambda logits, ps: generalized_kl_loss(logits, ps.x_1, ps.x_t, ps.t, path)


class TeacherTask(Task):
    """One step: x_1 from the data, t ~ U[0, 1], x_t ~ p_t(· | x_1), loss on p_θ(x_1 | x_t).

    Args:
        model: the teacher being trained.
        data: where x_1 comes from.
        loss: "ce" or "gkl".
        batch_size: B.
        seed: the run seed (fixes the held-out batches and their noise).
    """

    name = "teacher"

    def __init__(self, model: FlowModel, data: DataSource, loss: str, batch_size: int, seed: int):
        self.model, self.data, self.batch_size, self.seed = model, data, batch_size, seed
        self.path = model.config.path()
        self.loss_fn = _loss_fn(loss, self.path)
        heldout_gen = torch.Generator().manual_seed(seed + 7919)
        self.heldout = [data.heldout(batch_size, heldout_gen) for _ in range(4)]

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        x_1 = self.data.batch(self.batch_size, gen)
        t = torch.rand(self.batch_size, generator=gen)
        ps = self.path.sample(x_1, t, gen)
        return self.loss_fn(self.model(ps.x_t, t), ps)

    def evaluate(self) -> dict:
        """heldout_loss: the mean loss of 4 fixed held-out batches at fixed (t, x_t)."""
        gen = torch.Generator().manual_seed(self.seed + 104729)
        total = 0.0
        for x_1 in self.heldout:
            t = torch.rand(x_1.shape[0], generator=gen)
            ps = self.path.sample(x_1, t, gen)
            total += self.loss_fn(self.model(ps.x_t, t), ps).item()
        return {"heldout_loss": total / len(self.heldout)}

    def save(self, directory: Path) -> None:
        save_checkpoint(directory, self.model, self.data.tokenizer(), self.data.checkpoint_files())


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
    loop = TrainLoop(
        loop_config(cfg), TeacherTask(model, data, cfg.loss, cfg.batch_size, cfg.seed), out
    )
    run = loop.run(progress)
    final = out / "final"
    with loop.averaged():
        model.config = model.config.replace(
            provenance={"trainer": "teacher", "steps": cfg.steps, "run_config": _jsonable(cfg)}
        )
        ident = save_checkpoint(final, model.eval(), data.tokenizer(), data.checkpoint_files())
    heldout_loss = loop.evaluate()["heldout_loss"]
    return TrainResult(final, ident, cfg.steps, run.last["loss"], heldout_loss, run.history)


def _special_tokens(data: DataSource) -> dict:
    eos = data.describe().get("eos_token_id")
    return {} if eos is None else {"eos": eos}


def _jsonable(cfg: TeacherTrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("out")
    d.pop("report_to")
    return d
