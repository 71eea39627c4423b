"""Compass training by generation-aware noise-contrastive estimation (NCE).

Positives are real sequences x_1 noised to time t along the mixture path, x_t ~ p_t(· | x_1);
negatives are the teacher's own trajectory states at the same t. Both follow one reveal order
(``tsdfm.models.solver.RevealPlan``, :func:`noise_like`): "random", the path's own rule, or
"dilated", the order of a dataset built with ``--reveal-order dilated``, so that the compass
learns on the reveal patterns it will score. With energy E_θ(x_t, t) and the logistic
classifier P(real | x_t, t) = σ(−E_θ(x_t, t)), the loss is the binary cross-entropy with
logit −E averaged over the B positives and B negatives of a step:

    ℓ(θ) = ½ [ mean_b softplus(E_θ(x_t^{+,b}, t_b)) + mean_b softplus(−E_θ(x_t^{−,b}, t_b)) ]

(ℓ = ln 2 at E ≡ 0). Its minimiser is E* = log q_t(x_t) − log p_data,t(x_t), q the
distribution of the negatives: low energy where real data is likelier than the teacher's states.

Tempered negatives. A good teacher's own states are nearly indistinguishable from real data
(q ≈ p_data makes E* ≈ 0 and carries no ranking), yet the navigator needs a ranking *among*
teacher states: which candidate is likelier under the data. So the negatives are the teacher's
trajectories sampled at temperature T ≥ 1 (every draw from p(x_1 | x_t)^{1/T}, renormalised).
Were the tempered states distributed as q_T ∝ p_data^{1/T}, the optimum would be

    E*(x_t, t) = −(1 − 1/T) · log p_data,t(x_t) + const(t),

a likelihood ranker at every t, sharpened by the teacher's own errors where q_T and p_data
differ otherwise. Two caveats (docs/compass.md): per-token tempering only approximates
p^{1/T}, and the normaliser of p^{1/T} depends on the reveal pattern of x_t, so the tempered
optimum also rewards revealing more tokens; it ranks like the likelihood only among states
with the same reveal pattern (``NavigatorConfig.shared_reveals`` or the dilated order).
T = 1 gives the plain generation-aware NCE (docs/compass.md).

Negatives come from a *bank* of (state, t) pairs: M fresh teacher trajectories, each rolled
over the uniform grid of N teacher steps and recorded at R grid times drawn uniformly from
{0, 1/N, …, 1}. The bank is rebuilt every ``refresh_every`` steps as a pure function of the
refresh index r = ⌊step / refresh_every⌋ (trajectory seeds seed·2^32 + r·M + j in the lane
:data:`NEGATIVE_LANE`, which no sampler or navigator uses), so a resumed run rebuilds exactly
the bank it was using. The bank is visited without replacement in an order fixed by
(seed, r): each step takes the next B entries and B real sequences noised to the same t. With
refresh_every · B ≤ M · R no negative is seen twice; a reused negative is one the compass can
memorise, and real positives are always fresh, so memorised negatives do not generalise.
Everything else random comes from the training loop's (``tsdfm.models.train.loop``) one
checkpointed ``torch.Generator``; the loop also owns the optimisation, EMA, resume and metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from tsdfm.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tsdfm.models.compass import check_teacher_identity, compass_config
from tsdfm.models.data.sources import LANGUAGE_FILE, DataSource, default_data_source
from tsdfm.models.errors import CheckpointError, ConfigError, DataError
from tsdfm.models.flow_model import CompassModel, FlowModel, ModelConfig
from tsdfm.models.rng import CounterRNG, trajectory_seed
from tsdfm.models.solver import (
    REVEAL_ORDERS,
    Counters,
    RevealPlan,
    TemperedDenoiser,
    noise_like,
    teacher_states,
)
from tsdfm.models.train.common import check_run_config, seeded
from tsdfm.models.train.loop import Task, TrainLoop, loop_config
from tsdfm.models.train.trackers import check_available, parse_report_to

# Lanes of the counter RNG reserved for the compass's teacher trajectories. Samplers and the
# navigator use lanes 0..K−1, so these trajectories are independent of every other trajectory
# with the same seed.
NEGATIVE_LANE = 0x4E4547  # "NEG": training bank
HELDOUT_LANE = 0x484F4C  # "HOL": fixed held-out negatives


def nce_loss(e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """ℓ = ½ [mean softplus(E⁺) + mean softplus(−E⁻)]: BCE with logit −E, real = class 1.

    Args:
        e_pos: (B,) energies of real noised sequences.
        e_neg: (B',) energies of teacher states.
    """
    return 0.5 * (F.softplus(e_pos).mean() + F.softplus(-e_neg).mean())


def token_ratio_loss(
    r: torch.Tensor, x_1: torch.Tensor, log_q: torch.Tensor, where: torch.Tensor
) -> torch.Tensor:
    """Loss of the token-ratio compass: the cross-entropy of the real tokens under the
    teacher's posterior *corrected* by the compass, averaged over the positions ``where``:

        ℓ_i = −log softmax_v(log q(v | X, i) + r[i, v]) at v = x_1^i

    Its minimiser is log q + r* = log p_data(· | X, i) + c(X, i), i.e.
    r*[i, v] = log p_data(v | X, i) − log q(v | X, i) + c(X, i): the per-token density ratio up
    to a constant per (X, i), which every sibling of a midpoint shares (they share X and the
    positions of the segment) and so cancels in their softmax. A full-softmax proper score, it
    learns the ratio far faster than per-token logistic classification against q (which has
    the same optimum with c = 0; docs/compass.md). At r = 0 the loss is the teacher's own.

    Args:
        r: (B, L, V) log-ratios of the compass at the contexts X.
        x_1: (B, L) real tokens.
        log_q: (B, L, V) the teacher's log posterior at X.
        where: (B, L) bool, the positions that count (masked in X).
    """
    lp = torch.log_softmax(log_q + r, dim=-1).gather(-1, x_1.unsqueeze(-1)).squeeze(-1)
    w = where.to(lp.dtype)
    return -(lp * w).sum() / w.sum().clamp_min(1.0)


class NegativeSource(Protocol):
    """Where the compass's negatives come from: (state, t) pairs of one teacher.

    Attributes:
        teacher_identity: identity of the teacher whose states these are.
    """

    teacher_identity: str

    def bank(self, refresh: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank of refresh r: (M·R, L) int64 states and (M·R,) float32 times; a pure
        function of r."""
        ...

    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed held-out set, disjoint from every bank: states and times."""
        ...

    def describe(self) -> dict: ...


class TeacherNegatives:
    """Negatives generated on the fly with the teacher's N-step sampler.

    Args:
        teacher: the teacher model (eval mode).
        teacher_identity: its checkpoint identity.
        n_steps: N.
        trajectories: M trajectories per bank.
        records: R states recorded per trajectory.
        heldout_trajectories: trajectories of the held-out set (R records each).
        temperature: T of the teacher's draws (the module docstring says why T > 1).
        plan: reveal order of the rollouts (:class:`tsdfm.models.solver.RevealPlan`); None = random.
        seed: base seed; bank r uses trajectory seeds seed·2^32 + r·M + j in lane NEGATIVE_LANE,
            the held-out set seeds seed·2^32 + j in lane HELDOUT_LANE. Record times are drawn
            from a generator seeded with seed·2^20 + r for bank r and 2^62 + seed for the
            held-out set.
        device: where the teacher runs.
    """

    def __init__(
        self,
        teacher: FlowModel,
        teacher_identity: str,
        n_steps: int,
        trajectories: int,
        records: int,
        heldout_trajectories: int,
        seed: int,
        device: str | torch.device = "cpu",
        temperature: float = 1.0,
        plan: RevealPlan | None = None,
    ):
        self.teacher = teacher.eval()
        self.temperature = float(temperature)
        self.plan = plan if plan is not None else RevealPlan()
        self.sampler = TemperedDenoiser(self.teacher, temperature)
        self.teacher_identity = teacher_identity
        self.n_steps = n_steps
        self.trajectories = trajectories
        self.records = records
        self.heldout_trajectories = heldout_trajectories
        self.seed = seed
        self.device = torch.device(device)
        self.counters = Counters()

    def _states(self, seeds: torch.Tensor, lane: int, gen_seed: int):
        gen = torch.Generator().manual_seed(gen_seed)
        record_at = torch.randint(0, self.n_steps + 1, (len(seeds), self.records), generator=gen)
        cfg = self.teacher.config
        rng = CounterRNG(seeds.to(self.device), lane)
        x = teacher_states(
            self.sampler,
            cfg.path(),
            rng,
            cfg.seq_len,
            self.n_steps,
            record_at,
            self.counters,
            self.plan,
        )
        t = record_at.to(torch.float64) / self.n_steps
        return x.reshape(-1, cfg.seq_len), t.reshape(-1).float().to(self.device)

    def bank(self, refresh: int) -> tuple[torch.Tensor, torch.Tensor]:
        M = self.trajectories
        seeds = trajectory_seed(self.seed, refresh * M + torch.arange(M, dtype=torch.long))
        return self._states(seeds, NEGATIVE_LANE, self.seed * 2**20 + refresh)

    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        seeds = trajectory_seed(
            self.seed, torch.arange(self.heldout_trajectories, dtype=torch.long)
        )
        return self._states(seeds, HELDOUT_LANE, 2**62 + self.seed)

    def describe(self) -> dict:
        """What the negatives are; the reveal order only when it is not random (so that the
        description of a random-order source, and the run identity with it, stays as it was)."""
        d = {
            "kind": "teacher-rollouts",
            "teacher_identity": self.teacher_identity,
            "teacher_steps": self.n_steps,
            "temperature": self.temperature,
            "trajectories_per_bank": self.trajectories,
            "records_per_trajectory": self.records,
            "lane": NEGATIVE_LANE,
            "heldout_lane": HELDOUT_LANE,
        }
        if self.plan.order != "random":
            d.update(reveal_order=self.plan.order, student_steps=self.plan.segments)
        return d


@dataclass(frozen=True)
class CompassTrainConfig:
    """A compass NCE run.

    Args:
        out: run directory (checkpoints/, final/, metrics.jsonl, run_config.json).
        d_model, n_layers, n_heads: compass backbone size.
        steps, batch_size, lr, warmup, weight_decay, grad_clip, ema: optimisation; batch_size
            is B positives plus B negatives per step; ema = 0 switches EMA off.
        teacher_steps: N, steps of the teacher sampler that makes the negatives.
        negative_temperature: T of the teacher's draws for the negatives (T > 1 makes the
            compass a likelihood ranker; see the module docstring); 1 = plain teacher states.
        reveal_order: "random" (the path's rule) or "dilated": negatives and positives follow
            the reveal order of a dataset built with that order (mask source only).
        student_steps: S, segments of the dilated order (the dataset's student steps);
            teacher_steps must be a multiple of it. Ignored, and not recorded, under random.
        bank_trajectories: M fresh teacher trajectories per negative bank.
        records_per_trajectory: R states recorded per trajectory (bank size M·R). States of
            one trajectory share its revealed tokens, so a bank of few trajectories recorded
            many times invites memorising them; prefer more trajectories over more records.
        refresh_every: steps between bank rebuilds; keep refresh_every · batch_size ≤ M · R
            (the defaults: 64 · 64 = 256 · 16) so that no negative is drawn twice.
        heldout_trajectories: trajectories of the fixed held-out set (R records each, matched
            by as many real noised sequences).
        checkpoint_every: steps between resumable checkpoints (the last 2 are kept).
        eval_every: steps between held-out evaluations: ROC AUC of real vs teacher states
            within bins of t of width 1/8, averaged over bins (``heldout_auc``; the pooled AUC
            is ``heldout_auc_pooled``), NCE loss and mean energy gap.
        seed: seed of the run (initialisation, data generator, negative seeds).
        head: "scalar" (the pooled compass, sequence-level NCE) or "tokens" (the token-ratio
            compass: per-token log-ratios against the teacher's posterior at real contexts of
            the dilated order, :func:`token_ratio_loss`; needs reveal_order dilated and
            negative_temperature 1; no negative bank). At the teacher's size it starts from the
            teacher's weights, at any other size from its own random initialisation, both with
            a zero output layer (r = 0: selection starts blind; provenance ``init``). Recorded
            only when not "scalar".
        report_to: trackers that also get the metrics (``tsdfm.models.train.trackers``; not
            recorded: where metrics go is not part of the compass).
    """

    out: str
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.03
    grad_clip: float = 1.0
    ema: float = 0.999
    teacher_steps: int = 1024
    negative_temperature: float = 2.0
    bank_trajectories: int = 256
    records_per_trajectory: int = 16
    refresh_every: int = 64
    heldout_trajectories: int = 128
    checkpoint_every: int = 250
    eval_every: int = 250
    seed: int = 0
    reveal_order: str = "random"
    student_steps: int = 8
    head: str = "scalar"
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        check_available(self.report_to)
        for name in (
            "steps",
            "batch_size",
            "teacher_steps",
            "bank_trajectories",
            "records_per_trajectory",
            "refresh_every",
            "heldout_trajectories",
            "checkpoint_every",
            "eval_every",
            "student_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if not 1.0 <= self.negative_temperature <= 10.0:
            raise ConfigError(
                f"negative_temperature={self.negative_temperature} must lie in [1, 10]"
            )
        if not self.lr > 0 or self.warmup < 0 or not 0 <= self.ema < 1:
            raise ConfigError("lr must be > 0, warmup >= 0 and ema in [0, 1)")
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed={self.seed} must lie in [0, 2^31)")
        if self.reveal_order not in REVEAL_ORDERS:
            raise ConfigError(
                f"reveal_order={self.reveal_order!r} is unknown; use random or dilated (the "
                "order of the dataset the compass will score)"
            )
        S, N = self.student_steps, self.teacher_steps
        if self.reveal_order == "dilated" and N % S:
            raise ConfigError(
                f"teacher_steps={N} is not divisible by student_steps={S}: under the dilated "
                f"order every segment needs the same number of teacher steps; pick N as a "
                f"multiple of S (e.g. {S * max(1, round(N / S))})"
            )

        if self.head not in ("scalar", "tokens"):
            raise ConfigError(f"head={self.head!r} is unknown; use scalar or tokens")
        if self.head == "tokens" and (
            self.reveal_order != "dilated" or self.negative_temperature != 1.0
        ):
            raise ConfigError(
                "the token-ratio compass (head tokens) estimates log p_data − log q of the "
                "teacher itself in the dilated order; use reveal_order dilated and "
                "negative_temperature 1"
            )

    def plan(self) -> RevealPlan:
        """The reveal plan of negatives and positives: ``reveal_order`` over S segments."""
        return RevealPlan(self.reveal_order, self.student_steps)


@dataclass
class CompassTrainResult:
    final_dir: Path
    identity: str
    steps: int
    final_loss: float
    heldout_auc: float
    heldout_loss: float
    history: list[dict]


def _as_teacher(teacher: Checkpoint | str | Path, device: str | torch.device) -> Checkpoint:
    if not isinstance(teacher, Checkpoint):
        return load_checkpoint(teacher, device, role="teacher")
    if teacher.config.role != "teacher":
        raise CheckpointError(
            f"{teacher.spec} is a {teacher.config.role} checkpoint, but a teacher is needed here"
        )
    teacher.model.to(device).eval()
    return teacher


def _check_data(data: DataSource, tcfg: ModelConfig, teacher_name: str) -> None:
    if data.vocab_size != tcfg.vocab_size or data.seq_len != tcfg.seq_len:
        raise DataError(
            f"training data has vocabulary {data.vocab_size} and length {data.seq_len}, teacher "
            f"{teacher_name} has {tcfg.vocab_size} and {tcfg.seq_len}; use the teacher's data"
        )


def _check_batch(x: torch.Tensor, n: int, tcfg: ModelConfig, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] == 0 or x.numel() == 0:
        raise DataError(
            f"{what} is empty (got shape {tuple(x.shape)}); give the compass non-empty "
            "training data of the teacher's kind"
        )
    if x.shape != (n, tcfg.seq_len):
        raise DataError(
            f"{what} has shape {tuple(x.shape)}, expected ({n}, {tcfg.seq_len}); the data "
            "source must return (batch, seq_len) token ids"
        )
    if x.min() < 0 or x.max() >= tcfg.vocab_size:
        raise DataError(
            f"{what} holds token ids in [{int(x.min())}, {int(x.max())}], outside the teacher's "
            f"data vocabulary [0, {tcfg.vocab_size})"
        )
    return x


def train_compass(
    cfg: CompassTrainConfig,
    teacher_ckpt: Checkpoint | str | Path,
    data_source: DataSource | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    negatives: NegativeSource | None = None,
    allow_teacher_mismatch: bool = False,
    device: str | torch.device = "cpu",
) -> CompassTrainResult:
    """Train (or resume) a compass for ``teacher_ckpt``; returns where the final checkpoint is.

    Args:
        cfg: the run.
        teacher_ckpt: the teacher (a loaded Checkpoint, a directory or ``org/name[@rev]``).
        data_source: real sequences of the teacher's data; default: the synthetic language
            stored beside the teacher.
        progress: called as progress(step, total, metrics) after every step.
        negatives: where teacher states come from; default: fresh rollouts of the teacher
            (:class:`TeacherNegatives`). A source from another teacher is refused.
        allow_teacher_mismatch: warn instead of refusing negatives of another teacher.
        device: where the teacher and the compass run.
    """
    teacher = _as_teacher(teacher_ckpt, device)
    tcfg = teacher.config
    plan = cfg.plan()
    if plan.order != "random" and tcfg.source != "mask":
        raise ConfigError(
            f"reveal_order={plan.order!r} needs a mask-source teacher, but teacher "
            f"{teacher.spec} has the {tcfg.source} source; use reveal_order random"
        )
    data = data_source if data_source is not None else default_data_source(teacher)
    _check_data(data, tcfg, teacher.spec)
    if cfg.head == "tokens":
        if negatives is not None:
            raise ConfigError(
                "the token-ratio compass takes its negatives from the teacher's posterior at "
                "real contexts; it uses no negative source"
            )
        negatives = TeacherPosterior(teacher.model, teacher.identity, plan)
    if negatives is None:
        negatives = TeacherNegatives(
            teacher.model,
            teacher.identity,
            cfg.teacher_steps,
            cfg.bank_trajectories,
            cfg.records_per_trajectory,
            cfg.heldout_trajectories,
            cfg.seed,
            device,
            cfg.negative_temperature,
            plan,
        )
    neg_info = negatives.describe()
    _check_negative_order(neg_info, plan)
    check_teacher_identity(
        negatives.teacher_identity,
        teacher.identity,
        f"negative source {neg_info.get('kind', type(negatives).__name__)}",
        teacher.spec,
        allow_teacher_mismatch,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "run": _jsonable(cfg),
        "teacher": teacher.identity,
        "negatives": neg_info,
        "data": data.describe(),
    }
    check_run_config(out, record, holds="a compass run")
    objective = (
        "per-token density ratio (cross-entropy of real tokens under log q + r)"
        if cfg.head == "tokens"
        else "generation-aware NCE (logistic, logit -E)"
    )
    provenance = {
        "trainer": "compass",
        "objective": objective,
        "teacher": teacher.spec,
        "teacher_identity": teacher.identity,
        "negatives": neg_info,
        "run_config": record["run"],
    }
    if plan.order != "random":  # a compass says which order it was trained for
        provenance.update(reveal_order=plan.order, student_steps=plan.segments)
    with seeded(cfg.seed):
        model = CompassModel(
            compass_config(
                tcfg, cfg.d_model, cfg.n_layers, cfg.n_heads, provenance=provenance, head=cfg.head
            )
        )
    if cfg.head == "tokens":
        provenance["init"] = start = token_compass_init(model, teacher)
        model.config = model.config.replace(provenance={**model.config.provenance, "init": start})
    model.to(device)
    if cfg.head == "tokens":
        task = TokenRatioTask(model, cfg, data, teacher, device)
    else:
        task = CompassTask(model, cfg, negatives, data, teacher, device)
    loop = TrainLoop(loop_config(cfg), task, out)
    run = loop.run(progress)
    final_metrics = loop.evaluate()
    final = out / "final"
    with loop.averaged():
        model.config = model.config.replace(
            provenance={
                **provenance,
                "steps": cfg.steps,
                "heldout_auc": final_metrics["heldout_auc"],
            }
        )
        ident = save_checkpoint(final, model.eval(), teacher.tokenizer, task.files)
    return CompassTrainResult(
        final,
        ident,
        cfg.steps,
        run.last["loss"],
        final_metrics["heldout_auc"],
        final_metrics["heldout_loss"],
        run.history,
    )


class CompassTask(Task):
    """One NCE step: the next B entries of the shuffled negative bank of refresh
    r = ⌊step / refresh_every⌋ (rebuilt when r changes, a pure function of r) and B real
    sequences noised to the same times in the run's reveal order.

    Args:
        model: the compass being trained.
        cfg: the run.
        negatives: where the teacher states come from.
        data: real sequences of the teacher's data.
        teacher: the teacher (its tokenizer and data files travel with every checkpoint).
        device: where the compass runs.
    """

    def __init__(
        self,
        model: CompassModel,
        cfg: CompassTrainConfig,
        negatives: NegativeSource,
        data: DataSource,
        teacher: Checkpoint,
        device: str | torch.device,
    ):
        self.model, self.cfg, self.negatives, self.data = model, cfg, negatives, data
        self.teacher, self.device = teacher, torch.device(device)
        self.tcfg, self.plan = teacher.config, cfg.plan()
        self.path = self.tcfg.path()
        self.files = _checkpoint_files(teacher)
        self.heldout = _heldout_set(
            negatives, data, self.path, self.plan, self.tcfg, cfg.seed, self.device
        )
        self.bank_index, self.bank = -1, None
        self.step_metrics: dict = {}

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        refresh = step // cfg.refresh_every
        self.step_metrics = {}
        if refresh != self.bank_index:
            tb = time.perf_counter()
            self.bank = _shuffled(self.negatives.bank(refresh), cfg.seed, refresh)
            self.bank_index = refresh
            self.step_metrics["bank_seconds"] = time.perf_counter() - tb
        x_neg, t = _draw(self.bank, step - refresh * cfg.refresh_every, cfg.batch_size)
        x_1 = _check_batch(self.data.batch(cfg.batch_size, gen), cfg.batch_size, self.tcfg, "data")
        x_pos = noise_like(self.path, self.plan, x_1, t.cpu(), gen).to(self.device)
        e_pos, e_neg = _energies(self.model, x_pos, x_neg, t.to(self.device))
        accuracy = 0.5 * ((e_pos < 0).float().mean() + (e_neg > 0).float().mean())
        self.step_metrics = {"accuracy": accuracy.item(), **self.step_metrics}
        return nce_loss(e_pos, e_neg)

    def describe(self) -> dict:
        """accuracy of the step's classifier; bank_seconds when the step rebuilt the bank."""
        return self.step_metrics

    def evaluate(self) -> dict:
        return _heldout_metrics(self.model, self.heldout)

    def save(self, directory: Path) -> None:
        save_checkpoint(directory, self.model, self.teacher.tokenizer, self.files)


class TeacherPosterior:
    """The token-ratio compass's negatives: the teacher's posterior q(· | X, i) at real
    contexts X, computed exactly (no rollouts, no bank). Only describes itself."""

    def __init__(self, teacher: FlowModel, teacher_identity: str, plan: RevealPlan):
        self.teacher, self.teacher_identity, self.plan = teacher.eval(), teacher_identity, plan

    def describe(self) -> dict:
        return {
            "kind": "teacher-posterior",
            "teacher_identity": self.teacher_identity,
            "temperature": 1.0,
            "reveal_order": self.plan.order,
            "student_steps": self.plan.segments,
        }


class TokenRatioTask(Task):
    """One step of the token-ratio compass: B real sequences masked as the dilated plan masks
    them at a random segment end t_k = k/S, k ~ U{0..S−1} (the contexts X a midpoint's
    siblings share), the teacher's log posterior at X, and :func:`token_ratio_loss` over every
    masked position of X. The held-out set is fixed (seed + 7919): its metrics are the loss
    and ``heldout_auc``, the ROC AUC of r at the real token against r at a token drawn from q
    (r centred by its q-mean per position, which removes the constant siblings share), over
    the positions of segment k (the ones a midpoint scores).

    Args:
        model: the compass being trained (head tokens).
        cfg: the run.
        data: real sequences of the teacher's data.
        teacher: the teacher (q, and its tokenizer and data files travel with checkpoints).
        device: where compass and teacher run.
    """

    def __init__(
        self,
        model: CompassModel,
        cfg: CompassTrainConfig,
        data: DataSource,
        teacher: Checkpoint,
        device: str | torch.device,
    ):
        self.model, self.cfg, self.data, self.teacher = model, cfg, data, teacher
        self.device = torch.device(device)
        self.tcfg, self.plan = teacher.config, cfg.plan()
        self.path = self.tcfg.path()
        self.files = _checkpoint_files(teacher)
        self.step_metrics: dict = {}
        gen = torch.Generator().manual_seed(cfg.seed + 7919)
        n = cfg.heldout_trajectories
        x_1 = _check_batch(self.data.heldout(n, gen), n, self.tcfg, "held-out data")
        self.heldout = self._contexts(x_1, gen)
        self.heldout["u"] = torch.rand(x_1.shape, generator=gen, dtype=torch.float64)

    def _contexts(self, x_1: torch.Tensor, gen: torch.Generator) -> dict:
        S = self.plan.segments
        k = torch.randint(0, S, (x_1.shape[0],), generator=gen)
        t = k.double() / S
        x = noise_like(self.path, self.plan, x_1, t, gen).to(self.device)
        with torch.no_grad():
            log_q = torch.log_softmax(self.teacher.model(x, t.float().to(self.device)), -1)
        return {"x": x, "x_1": x_1.to(self.device), "t": t.to(self.device), "k": k, "log_q": log_q}

    def _loss(self, c: dict) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.model.log_ratios(c["x"], c["t"])
        masked = c["x"] == self.tcfg.mask_token_id
        return token_ratio_loss(r, c["x_1"], c["log_q"], masked), r

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        n = self.cfg.batch_size
        x_1 = _check_batch(self.data.batch(n, gen), n, self.tcfg, "data")
        loss, _ = self._loss(self._contexts(x_1, gen))
        return loss

    def describe(self) -> dict:
        return self.step_metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        from tsdfm.models.eval.compass_metrics import energy_auc

        h = self.heldout
        loss, r = self._loss(h)
        r = r - (h["log_q"].exp() * r).sum(-1, keepdim=True)  # the per-position constant out
        seg = self.plan.segment_of(self.path, self.tcfg.seq_len, self.device)
        scored = seg.unsqueeze(0) == h["k"].to(self.device).unsqueeze(1)
        cdf = h["log_q"].double().exp().cumsum(-1)
        u = h["u"].to(self.device).unsqueeze(-1) * cdf[..., -1:]
        drawn = torch.searchsorted(cdf, u).squeeze(-1).clamp_max(self.tcfg.vocab_size - 1)
        r_real = r.gather(-1, h["x_1"].unsqueeze(-1)).squeeze(-1)[scored]
        r_teacher = r.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)[scored]
        # energy_auc takes energies (low = real): the negated log-ratios
        return {
            "heldout_auc": energy_auc(-r_real, -r_teacher),
            "heldout_loss": loss.item(),
            "heldout_ratio_gap": (r_real.mean() - r_teacher.mean()).item(),
        }

    def save(self, directory: Path) -> None:
        save_checkpoint(directory, self.model, self.teacher.tokenizer, self.files)


def token_compass_init(model: CompassModel, teacher: Checkpoint) -> str:
    """Where a token-ratio compass starts, always with r ≡ 0 (a zero output layer: selection
    starts blind). At the teacher's size: the teacher's features, i.e. its backbone weights
    and a zero time branch (the teacher may be unconditioned); returns "teacher". At any other
    size: the compass's own random initialisation; returns "random"."""
    tb, cb = teacher.config.backbone, model.config.backbone
    size = ("d_model", "n_layers", "n_heads", "mlp_ratio")
    layers = [model.backbone.out]
    start = "random"
    if all(getattr(tb, k) == getattr(cb, k) for k in size):
        missing, unexpected = model.backbone.load_state_dict(
            teacher.model.backbone.state_dict(), strict=False
        )
        assert not unexpected and all(k.startswith("time_emb.") for k in missing), (
            missing,
            unexpected,
        )
        layers.append(model.backbone.time_emb.mlp[-1])
        start = "teacher"
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()
    return start


def _shuffled(bank, seed: int, refresh: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank in the order it is visited: a permutation fixed by (seed, refresh)."""
    x, t = bank
    if x.shape[0] == 0:
        raise DataError("the negative bank is empty; the negative source returned no states")
    gen = torch.Generator().manual_seed(2**61 + seed * 2**20 + refresh)
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return x[order], t[order]


def _draw(bank, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries i·n … i·n + n − 1 of the shuffled bank (cycling when it runs out)."""
    x, t = bank
    idx = (i * n + torch.arange(n, device=x.device)) % x.shape[0]
    return x[idx], t[idx]


def _energies(model, x_pos, x_neg, t) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over [positives; negatives] at the same times."""
    e = model(torch.cat([x_pos, x_neg]), torch.cat([t, t]))
    return e[: x_pos.shape[0]], e[x_pos.shape[0] :]


def _heldout_set(negatives, data, path, plan, tcfg, seed: int, device) -> dict:
    """Fixed held-out negatives and as many real sequences noised to the same times (in the
    reveal order of ``plan``)."""
    x_neg, t = negatives.heldout()
    n = x_neg.shape[0]
    gen = torch.Generator().manual_seed(seed + 7919)
    x_1 = _check_batch(data.heldout(n, gen), n, tcfg, "held-out data")
    x_pos = noise_like(path, plan, x_1, t.cpu(), gen)
    return {"x_pos": x_pos.to(device), "x_neg": x_neg.to(device), "t": t.to(device)}


@torch.no_grad()
def _heldout_metrics(model, heldout: dict, chunk: int = 1024) -> dict:
    """Held-out ROC AUC (stratified by t, and pooled), NCE loss and energy gap of ``model``
    as it is (the loop calls it under the EMA weights, in eval mode)."""
    from tsdfm.models.eval.compass_metrics import energy_auc, stratified_auc

    e_pos, e_neg = [], []
    for i in range(0, heldout["t"].shape[0], chunk):
        sl = slice(i, i + chunk)
        p, q = _energies(model, heldout["x_pos"][sl], heldout["x_neg"][sl], heldout["t"][sl])
        e_pos.append(p)
        e_neg.append(q)
    e_pos, e_neg = torch.cat(e_pos), torch.cat(e_neg)
    return {
        "heldout_auc": stratified_auc(e_pos, e_neg, heldout["t"], heldout["t"]),
        "heldout_auc_pooled": energy_auc(e_pos, e_neg),
        "heldout_loss": nce_loss(e_pos, e_neg).item(),
        "heldout_energy_gap": (e_neg.mean() - e_pos.mean()).item(),
    }


def _checkpoint_files(teacher: Checkpoint) -> dict[str, Path]:
    """The teacher's data files that travel with the compass (the synthetic language)."""
    name = teacher.config.data.get("language", LANGUAGE_FILE)
    f = teacher.file(name, "config.json data.language")
    if teacher.config.data.get("kind") != "synthetic" or not f.is_file():
        return {}
    return {f.relative_to(teacher.directory.resolve()).as_posix(): f}


def _check_negative_order(neg_info: dict, plan: RevealPlan) -> None:
    """Negatives must follow the run's reveal order (a source without ``reveal_order`` in its
    description is random-order)."""
    got = (neg_info.get("reveal_order", "random"), neg_info.get("student_steps"))
    want = (plan.order, None if plan.order == "random" else plan.segments)
    if got != want:
        kind = neg_info.get("kind", "negatives")
        raise ConfigError(
            f"negative source {kind} follows the {got[0]} reveal order"
            + (f" over {got[1]} segments" if got[1] is not None else "")
            + f", but the run trains for the {want[0]} order"
            + (f" over {want[1]} segments" if want[1] is not None else "")
            + "; build the negatives in the run's order (describe() says reveal_order and "
            "student_steps)"
        )


def _jsonable(cfg: CompassTrainConfig) -> dict:
    """The recorded run config: every field but ``out``; reveal_order and student_steps only
    for a non-random order, so that a random-order run keeps the record (and the compass
    identity) it had before the fields existed."""
    d = asdict(cfg)
    d.pop("out")
    d.pop("report_to")  # where metrics also go is not part of what was trained
    if cfg.reveal_order == "random":
        del d["reveal_order"], d["student_steps"]
    if cfg.head == "scalar":
        del d["head"]
    else:  # the token-ratio compass rolls no negatives: its bank fields mean nothing
        for key in ("teacher_steps", "bank_trajectories", "records_per_trajectory",
                    "refresh_every"):  # fmt: skip
            del d[key]
    return d
