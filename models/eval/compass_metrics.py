"""Measuring a scorer (the compass or any other) against a teacher.

Three measurements, each over several seeds (mean ± sd across seeds):

1. **Separation.** ROC AUC of real sequences noised to t against the teacher's own states at
   the same t, for each t in ``times``:

       AUC = P(E(x_t^real) < E(x_t^teacher)) + ½ P(=)          (Mann–Whitney, tied ranks)

   0.5 is chance; the states at t = 1 are the teacher's N-step samples.
2. **Agreement with the truth** (synthetic language). Spearman rank correlation ρ between the
   energy at t = 1 and the exact NLL −log p(x) of the teacher's samples, and of real samples.
3. **Selection gain.** From the same blind starting states x_{t_k} (lane 0 of the teacher
   sampler on the S-step grid, N/S teacher sub-steps per segment), the navigator's search step
   (``tsdfm.models.navigator.search_segment``) rolls K candidates to t_{k+1} in lanes 0..K−1
   with the global sub-step counters and keeps j* = argmin_j E(X_j, t_{k+1}); the trajectory
   then finishes blind (lane 0) to t = 1. Lane 0 is the blind continuation, so K = 1 is the
   blind trajectory itself and the comparison is paired:

       gain = mean_b NLL(x_1^{blind, b}) − mean_b NLL(x_1^{selected, b})    (nats / sequence)

   Positive gain means energy-guided selection made better sequences. Unigram entropy is
   reported beside it, since selection can buy likelihood with diversity.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from tsdfm.models.checkpoint import Checkpoint
from tsdfm.models.compass import CompassScorer, check_compass_for_teacher
from tsdfm.models.data.sources import DataSource, default_data_source, load_language
from tsdfm.models.errors import ConfigError
from tsdfm.models.eval.metrics import unigram_entropy
from tsdfm.models.navigator import NavigatorConfig, lane_rng, search_segment
from tsdfm.models.rng import CounterRNG, trajectory_seed
from tsdfm.models.scorer import Scorer
from tsdfm.models.solver import DenoiserCache, rollout, teacher_states, uniform_grid


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank; float64."""
    x = x.detach().double().cpu().flatten()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty_like(xs)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(xs, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        group_sum = torch.zeros(len(counts), dtype=torch.float64).index_add_(
            0, inverse, ranks[order]
        )
        ranks[order] = (group_sum / counts)[inverse]
    return ranks


def roc_auc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """P(s⁺ > s⁻) + ½ P(s⁺ = s⁻) from the rank-sum (Mann–Whitney U) statistic."""
    n_pos, n_neg = scores_pos.numel(), scores_neg.numel()
    if n_pos == 0 or n_neg == 0:
        raise ConfigError("ROC AUC needs at least one positive and one negative score")
    r = rank(torch.cat([scores_pos.flatten(), scores_neg.flatten()]))
    u = r[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def energy_auc(e_real: torch.Tensor, e_teacher: torch.Tensor) -> float:
    """AUC of telling real from teacher states by energy: P(E_real < E_teacher) + ½ P(=)."""
    return roc_auc(-e_real.float(), -e_teacher.float())


def stratified_auc(
    e_real: torch.Tensor,
    e_teacher: torch.Tensor,
    t_real: torch.Tensor,
    t_teacher: torch.Tensor,
    bins: int = 8,
) -> float:
    """Energy AUC within bins of t of width 1/bins, averaged over the bins holding both kinds.

    A pooled AUC also rewards (or punishes) an energy offset that depends on t alone; within a
    bin only the content of the states counts.
    """
    b_real = (t_real.float() * bins).long().clamp(0, bins - 1)
    b_teacher = (t_teacher.float() * bins).long().clamp(0, bins - 1)
    aucs = [
        energy_auc(e_real[b_real == b], e_teacher[b_teacher == b])
        for b in range(bins)
        if (b_real == b).any() and (b_teacher == b).any()
    ]
    return statistics.fmean(aucs) if aucs else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ: Pearson correlation of the (tie-averaged) ranks; nan if one is constant."""
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


@dataclass(frozen=True)
class CompassEvalConfig:
    """What to measure.

    Args:
        times: times t of the AUC measurement.
        samples: trajectories (and real sequences) per seed.
        seeds: seeds s = seed .. seed + seeds − 1; trajectory i of seed s has counter seed
            s·2^32 + i (lane 0), as in ``tsdfm-pipeline eval``.
        teacher_steps: N.
        student_steps: S of the selection grid (N must be a multiple of S).
        candidates: K candidates per selection.
        midpoints: segments k whose start t_k = k / S is shaped (1 ≤ k < S).
        batch_size: trajectories per batched rollout.
        seed: first seed.
    """

    times: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    samples: int = 512
    seeds: int = 3
    teacher_steps: int = 1024
    student_steps: int = 8
    candidates: int = 8
    midpoints: tuple[int, ...] = (2, 4, 6)
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "seeds", "teacher_steps", "student_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if not self.times or any(not 0.0 <= t <= 1.0 for t in self.times):
            raise ConfigError(f"times {list(self.times)} must lie in [0, 1]")
        if self.teacher_steps % self.student_steps:
            raise ConfigError(
                f"teacher_steps={self.teacher_steps} is not a multiple of "
                f"student_steps={self.student_steps}"
            )
        if self.candidates < 2:
            raise ConfigError(f"candidates={self.candidates} must be at least 2 to select")
        if any(not 1 <= k < self.student_steps for k in self.midpoints):
            raise ConfigError(
                f"midpoints {list(self.midpoints)} must lie in 1..{self.student_steps - 1}"
            )


def _mean_sd(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else float("nan"),
        "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "per_seed": values,
    }


def _energy(scorer: Scorer, x: torch.Tensor, t: float, chunk: int) -> torch.Tensor:
    return torch.cat([scorer.energy(x[i : i + chunk], t) for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def separation(
    scorer: Scorer,
    teacher: Checkpoint,
    data: DataSource,
    cfg: CompassEvalConfig,
    seed: int,
    device,
) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """AUC per t for one seed; also the teacher's final samples and their energies at t = 1.

    Returns:
        (AUC per t in cfg.times, (n, L) teacher samples at t = 1, (n,) their energies).
    """
    tcfg = teacher.config
    path = tcfg.path()
    N, n, T = cfg.teacher_steps, cfg.samples, len(cfg.times)
    idx = torch.tensor([round(t * N) for t in cfg.times], dtype=torch.long)
    states = []
    for b0 in range(0, n, cfg.batch_size):
        m = min(cfg.batch_size, n - b0)
        seeds = trajectory_seed(seed, torch.arange(b0, b0 + m, dtype=torch.long))
        rng = CounterRNG(seeds.to(device))
        record = torch.cat([idx, torch.tensor([N])]).expand(m, T + 1)
        states.append(teacher_states(teacher.model, path, rng, tcfg.seq_len, N, record))
    states = torch.cat(states)  # (n, T + 1, L)
    gen = torch.Generator().manual_seed(seed + 1)
    x_1 = data.heldout(n, gen)
    aucs = []
    for i in range(T):
        t = float(idx[i]) / N  # the grid time nearest to cfg.times[i]
        x_real = path.sample(x_1, torch.full((n,), t), gen).x_t.to(device)
        e_real = _energy(scorer, x_real, t, cfg.batch_size)
        e_teacher = _energy(scorer, states[:, i], t, cfg.batch_size)
        aucs.append(energy_auc(e_real, e_teacher))
    final = states[:, T]
    return aucs, final, _energy(scorer, final, 1.0, cfg.batch_size)


@torch.no_grad()
def selection_gain(
    scorer: Scorer, teacher: Checkpoint, language, cfg: CompassEvalConfig, seed: int, device
) -> list[dict]:
    """Best-of-K selection at each midpoint vs the blind trajectory, for one seed.

    The selection is the navigator's own search step (``tsdfm.models.navigator.search_segment``,
    argmin over K independent lanes, the navigator's lane layout), applied to the one segment
    [t_k, t_{k+1}] and nowhere else.
    """
    tcfg = teacher.config
    path, model, L, V = tcfg.path(), teacher.model, tcfg.seq_len, tcfg.vocab_size
    N, S, K = cfg.teacher_steps, cfg.student_steps, cfg.candidates
    nav = NavigatorConfig(student_steps=S, teacher_steps=N, candidates=K, selection="argmin")
    n = nav.substeps
    grid = uniform_grid(N, device)
    ks = sorted(set(cfg.midpoints))
    per_k: dict[int, dict[str, list]] = {k: {} for k in ks}
    blind_final = []
    for b0 in range(0, cfg.samples, cfg.batch_size):
        m = min(cfg.batch_size, cfg.samples - b0)
        seeds = trajectory_seed(seed, torch.arange(b0, b0 + m, dtype=torch.long)).to(device)
        rng = CounterRNG(seeds)
        x, cache, cur = path.sample_source((m, L), rng), DenoiserCache(), 0
        starts = {}
        for k in ks:  # the blind trajectory, kept at every midpoint
            x, cache = rollout(model, path, x, grid[cur : k * n + 1], rng, cur, cache)
            cur = k * n
            starts[k] = (x, cache)
        x_blind, _ = rollout(model, path, x, grid[cur:], rng, cur, cache)
        blind_final.append(x_blind.cpu())
        lanes = lane_rng(seeds, K)
        for k in ks:
            x_k, c_k = starts[k]
            seg = grid[k * n : (k + 1) * n + 1]
            choice = search_segment(model, scorer, path, x_k, seg, k, k * n, nav, rng, lanes, c_k)
            x_sel, _ = rollout(
                model, path, choice.x, grid[(k + 1) * n :], rng, (k + 1) * n, choice.cache
            )
            j, e = choice.chosen, choice.energies
            acc = per_k[k]
            acc.setdefault("selected", []).append(x_sel.cpu())
            acc.setdefault("e_chosen", []).append(e.gather(1, j.unsqueeze(1)).squeeze(1).cpu())
            acc.setdefault("e_lane0", []).append(e[:, 0].cpu())
            acc.setdefault("chosen", []).append(j.cpu())
    blind = torch.cat(blind_final)
    nll_blind = -language.log_likelihood(blind)
    ent_blind = unigram_entropy(blind, V)
    results = []
    for k in ks:
        acc = {name: torch.cat(v) for name, v in per_k[k].items()}
        nll_sel = -language.log_likelihood(acc["selected"])
        ent_sel = unigram_entropy(acc["selected"], V)
        results.append(
            {
                "k": k,
                "t_k": k / S,
                "nll_blind": nll_blind.mean().item(),
                "nll_selected": nll_sel.mean().item(),
                "gain": (nll_blind.mean() - nll_sel.mean()).item(),
                "gen_ppl_blind": math.exp(nll_blind.sum().item() / nll_blind.numel() / L),
                "gen_ppl_selected": math.exp(nll_sel.sum().item() / nll_sel.numel() / L),
                "entropy_blind": ent_blind.mean().item(),
                "entropy_selected": ent_sel.mean().item(),
                "energy_lane0": acc["e_lane0"].mean().item(),
                "energy_chosen": acc["e_chosen"].mean().item(),
                "share_not_lane0": (acc["chosen"] != 0).double().mean().item(),
            }
        )
    return results


def evaluate_scorer(
    scorer: Scorer,
    teacher: Checkpoint,
    cfg: CompassEvalConfig,
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
    data: DataSource | None = None,
) -> dict:
    """All three measurements of ``scorer`` against ``teacher``; a JSON-able report.

    Args:
        scorer: any ``tsdfm.models.scorer.Scorer``.
        teacher: a teacher of the synthetic language (its exact likelihood is the truth).
        cfg: what to measure.
        device: where to run.
        progress: called as progress(phase, done, total) after each phase of a seed.
        data: where the real sequences come from (``heldout(n, generator)`` of a
            ``tsdfm.models.data.sources.DataSource``, in the teacher's vocabulary and length);
            None: the teacher's own (``default_data_source``).
    """
    from tsdfm.models.eval.evaluate import _device_info

    teacher.model.to(device).eval()
    data = default_data_source(teacher) if data is None else data
    tcfg = teacher.config
    if data.vocab_size != tcfg.vocab_size or data.seq_len != tcfg.seq_len:
        raise ConfigError(
            f"the data source has {data.vocab_size} tokens of length {data.seq_len}, teacher "
            f"{teacher.spec} {tcfg.vocab_size} of length {tcfg.seq_len}; pass a source of the "
            "teacher's vocabulary and sequence length"
        )
    language = load_language(teacher.directory, teacher.config.data)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    aucs, rho_teacher, rho_real, gains = [], [], [], []
    total = 2 * len(seeds)
    for i, s in enumerate(seeds):
        auc, final, e_final = separation(scorer, teacher, data, cfg, s, device)
        aucs.append(auc)
        rho_teacher.append(spearman(e_final, -language.log_likelihood(final.cpu())))
        real = data.heldout(cfg.samples, torch.Generator().manual_seed(s + 2))
        e_real = _energy(scorer, real.to(device), 1.0, cfg.batch_size)
        rho_real.append(spearman(e_real, -language.log_likelihood(real)))
        if progress:
            progress("separation", 2 * i + 1, total)
        gains.append(selection_gain(scorer, teacher, language, cfg, s, device))
        if progress:
            progress("selection", 2 * i + 2, total)
    midpoints = []
    for j, k in enumerate(sorted(set(cfg.midpoints))):
        rows = [g[j] for g in gains]
        entry = {"k": k, "t_k": k / cfg.student_steps}
        for key in rows[0]:
            if key not in ("k", "t_k"):
                entry[key] = _mean_sd([r[key] for r in rows])
        midpoints.append(entry)
    overall = [statistics.fmean(g["gain"] for g in per_seed) for per_seed in gains]
    return {
        "scorer": {
            "name": scorer.name,
            "identity": scorer.identity,
            "teacher_identity": getattr(scorer, "teacher_identity", None),
        },
        "teacher": {"spec": teacher.spec, "identity": teacher.identity},
        "data": data.describe(),
        "config": asdict(cfg),
        "device": _device_info(str(device)),
        "auc": {
            "times": list(cfg.times),
            "mean": [statistics.fmean(a[i] for a in aucs) for i in range(len(cfg.times))],
            "sd": [
                statistics.stdev(a[i] for a in aucs) if len(aucs) > 1 else 0.0
                for i in range(len(cfg.times))
            ],
            "per_seed": aucs,
        },
        "spearman": {
            "teacher_samples": _mean_sd(rho_teacher),
            "real_samples": _mean_sd(rho_real),
            "note": "rank correlation of the energy at t = 1 with the exact NLL (> 0 is good)",
        },
        "selection": {
            "candidates": cfg.candidates,
            "student_steps": cfg.student_steps,
            "teacher_steps": cfg.teacher_steps,
            "midpoints": midpoints,
            "gain": _mean_sd(overall),
            "note": "gain = mean exact NLL (nats/sequence) of blind minus selected finals",
        },
    }


def evaluate_compass(
    compass: Checkpoint,
    teacher: Checkpoint,
    cfg: CompassEvalConfig,
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
    allow_teacher_mismatch: bool = False,
    data: DataSource | None = None,
) -> dict:
    """Check that the compass fits the teacher (vocabulary, tokens, source, identity of the
    teacher whose negatives it saw), then :func:`evaluate_scorer` (``data`` as there)."""
    check_compass_for_teacher(compass, teacher, allow_teacher_mismatch)
    compass.model.to(device)
    scorer = CompassScorer.from_checkpoint(compass)
    return evaluate_scorer(scorer, teacher, cfg, device, progress, data)


def format_tables(report: dict) -> dict[str, list[list[str]]]:
    """Rows of the three tables (separation, rank correlation, selection) for the CLI and docs."""
    auc = report["auc"]
    sep = [
        [f"{t:.2f}", f"{m:.3f} ± {s:.3f}"]
        for t, m, s in zip(auc["times"], auc["mean"], auc["sd"], strict=True)
    ]
    sp = report["spearman"]
    rho = [
        [name, f"{sp[key]['mean']:.3f} ± {sp[key]['sd']:.3f}"]
        for name, key in (("teacher samples", "teacher_samples"), ("real samples", "real_samples"))
    ]
    sel = []
    for mp in report["selection"]["midpoints"]:
        sel.append(
            [
                f"{mp['t_k']:.3f}",
                f"{mp['nll_blind']['mean']:.3f}",
                f"{mp['nll_selected']['mean']:.3f}",
                f"{mp['gain']['mean']:+.3f} ± {mp['gain']['sd']:.3f}",
                f"{mp['gen_ppl_blind']['mean']:.3f} → {mp['gen_ppl_selected']['mean']:.3f}",
                f"{mp['entropy_blind']['mean']:.3f} → {mp['entropy_selected']['mean']:.3f}",
            ]
        )
    g = report["selection"]["gain"]
    sel.append(["all", "", "", f"{g['mean']:+.3f} ± {g['sd']:.3f}", "", ""])
    return {"separation": sep, "spearman": rho, "selection": sel}


TABLE_HEADERS = {
    "separation": ["t", "ROC AUC real vs teacher"],
    "spearman": ["at t = 1", "Spearman ρ(energy, exact NLL)"],
    "selection": [
        "midpoint t_k",
        "NLL blind",
        "NLL best-of-K",
        "gain (nats/seq)",
        "gen-PPL blind → selected",
        "entropy blind → selected",
    ],
}
