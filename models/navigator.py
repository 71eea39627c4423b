"""Energy-guided midpoint search: the trajectory-shaping step of TS-DFM (pure torch, no Ray).

Grid t_k = k / S for k = 0..S (S student steps); the teacher runs n = N / S jump steps per
segment. For a batch of trajectories with state x at t_k:

    if t_k ≥ τ and K > 1:                                    (a shaped segment)
        X_j = rollout of x from t_k to t_{k+1} in lane j,  j = 0..K−1   (one batch of B·K rows)
        e_j = E(X_j, t_{k+1})                                 (compass energy, lower = better)
        j*  = argmin_j e_j        or   j* ~ softmax(−e / T)
        x   = X_{j*}
    else:                                                     (a blind segment)
        x   = rollout of x from t_k to t_{k+1} in lane 0

Lane j draws its randomness from stream (seed, lane j) with the same global step counters as
the blind trajectory, so lane 0 *is* the blind continuation and K = 1 reproduces the plain
teacher sampler exactly. A trajectory's result does not depend on its batch-mates.

Two options make selection compare like with like. ``shared_reveals``: the lanes share the
reveal randomness (lane 0's JUMP stream), so every candidate reveals the same positions and
only the token draws differ; an energy then cannot prefer a candidate for revealing more or
fewer tokens. ``reveal_order = "dilated"``: every segment reveals a fixed, evenly spread group
of positions (``tsdfm.models.solver.RevealPlan``), the same group the student's S-step sampler
reveals at that step, so the trajectories follow a schedule the student can follow.

Selection by ``softmax`` at temperature 1 with an energy E = log q − log p (a density ratio:
an untempered NCE compass, or the exact scorer given the proposal ``log_q``) is importance
resampling: the kept candidate is distributed closer to p (the data) than the teacher's q,
without sharpening it. ``argmin`` keeps the mode of the K candidates (mode-seeking).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from tsdfm.models.errors import ConfigError
from tsdfm.models.path import MixturePath
from tsdfm.models.rng import CounterRNG, Stream, categorical
from tsdfm.models.solver import (
    Counters,
    Denoiser,
    RevealPlan,
    check_temperature,
    rollout,
    tempered,
    uniform_grid,
)

SELECTIONS = ("argmin", "softmax")


class Scorer(Protocol):
    """Energy of a batch of states at time t (lower = more coherent).

    A scorer with ``uses_proposal = True`` is also given ``log_q``: (B,) float64, the log
    probability with which the teacher drew the tokens each candidate revealed in the segment
    (its proposal), so that it can return a density-ratio energy log q − log p.
    """

    def energy(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """(B, L) int64 states → (B,) float32 energies."""
        ...


@dataclass(frozen=True)
class NavigatorConfig:
    """Shape of the search.

    Args:
        student_steps: S, segments of the grid.
        teacher_steps: N, jump steps of the teacher over [0, 1]; must be a multiple of S.
        candidates: K rollouts per shaped midpoint; K = 1 is the blind baseline.
        tau: shaping starts at the first segment with t_k ≥ τ.
        selection: "argmin" or "softmax" (sample with probabilities ∝ exp(−e / temperature)).
        temperature: softmax *selection* temperature (> 0).
        teacher_temperature: T > 0 of the teacher's own draws, softmax(logits / T)
            (``tsdfm.models.solver.TemperedDenoiser``); 1 is the teacher itself, T < 1 a sharper,
            lower-entropy teacher (a blind K = 1 build at T < 1 is the control arm for
            shaping at matched entropy).
        reveal_order: "random" (the path's own rule) or "dilated": segment k reveals a fixed,
            evenly spread group of positions (``tsdfm.models.solver.RevealPlan``), the group the
            student's S-step sampler will reveal at step k.
        shared_reveals: candidates of one midpoint share the reveal randomness (the JUMP
            stream of lane 0): the same positions move in every lane and only the token
            draws differ, so selection compares like with like; lane 0 stays the blind
            trajectory.
    """

    student_steps: int = 8
    teacher_steps: int = 1024
    candidates: int = 8
    tau: float = 0.0
    selection: str = "argmin"
    temperature: float = 1.0
    teacher_temperature: float = 1.0
    reveal_order: str = "random"
    shared_reveals: bool = False

    def __post_init__(self) -> None:
        S, N, K = self.student_steps, self.teacher_steps, self.candidates
        if S < 1 or N < 1:
            raise ConfigError(f"student_steps={S} and teacher_steps={N} must be positive")
        if N % S:
            raise ConfigError(
                f"teacher_steps={N} is not divisible by student_steps={S}; pick N as a multiple "
                f"of S (e.g. {S * max(1, round(N / S))})"
            )
        if K < 1:
            raise ConfigError(f"candidates K={K} must be at least 1 (K=1 is the blind baseline)")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"tau={self.tau} must lie in [0, 1]")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection {self.selection!r}; use argmin or softmax")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be positive")
        T = check_temperature(self.teacher_temperature, "teacher_temperature")
        object.__setattr__(self, "teacher_temperature", T)  # 1 and 1.0: one config, one print
        self.plan()  # validates reveal_order
        if not isinstance(self.shared_reveals, bool):
            raise ConfigError(f"shared_reveals={self.shared_reveals!r} must be true or false")

    def plan(self) -> RevealPlan:
        """The reveal plan of every rollout: ``reveal_order`` over the S segments."""
        return RevealPlan(self.reveal_order, self.student_steps)

    @property
    def substeps(self) -> int:
        return self.teacher_steps // self.student_steps

    def shaped_segments(self) -> list[bool]:
        """Which segments k are shaped: t_k ≥ τ and K > 1."""
        S = self.student_steps
        return [self.candidates > 1 and k / S >= self.tau - 1e-12 for k in range(S)]


@dataclass
class NavigationResult:
    """Trajectories of one batch.

    Attributes:
        times: (S+1,) float64 grid.
        states: (B, S+1, L) int64; states[:, 0] is the source sample, states[:, S] the final.
        energies: (B, S, K) float32 candidate energies (zeros in blind segments).
        chosen: (B, S) int64 selected lane (0 in blind segments).
        shaped: (S,) bool.
        counters: forward calls / passes / seconds in teacher and compass.
    """

    times: torch.Tensor
    states: torch.Tensor
    energies: torch.Tensor
    chosen: torch.Tensor
    shaped: torch.Tensor
    counters: Counters


def select(
    energies: torch.Tensor, cfg: NavigatorConfig, rng: CounterRNG, segment: int
) -> torch.Tensor:
    """Index of the kept candidate per row: argmin, or a softmax(−e/T) draw keyed by the
    trajectory's SELECT stream (float64 inverse CDF). energies: (B, K) → (B,) int64."""
    if cfg.selection == "argmin":
        return energies.argmin(dim=1)
    logits = -energies.double() / cfg.temperature
    p = torch.softmax(logits, dim=1)
    u = rng.uniform(segment, Stream.SELECT, 1)[:, 0]
    return categorical(p.cumsum(1), u)


@torch.no_grad()
def navigate(
    teacher: Denoiser,
    scorer: Scorer | None,
    path: MixturePath,
    seeds: torch.Tensor,
    seq_len: int,
    cfg: NavigatorConfig,
) -> NavigationResult:
    """Run energy-guided midpoint search for a batch of trajectories (see module docstring).

    Args:
        teacher: denoiser p(x_1 | x_t).
        scorer: energy model; may be None only when no segment is shaped.
        path: mixture path of the teacher.
        seeds: (B,) int64 trajectory seeds.
        seq_len: L.
        cfg: S, N, K, τ, selection.
    """
    teacher = tempered(teacher, cfg.teacher_temperature)  # itself at T = 1, else logits / T
    shaped = cfg.shaped_segments()
    if any(shaped) and scorer is None:
        raise ConfigError("shaping with K > 1 needs a compass; pass --compass or use K=1")
    S, K, n = cfg.student_steps, cfg.candidates, cfg.substeps
    B, device = len(seeds), seeds.device
    rng = CounterRNG(seeds)
    shared = (Stream.JUMP,) if cfg.shared_reveals else ()
    lanes = torch.arange(K, device=device).repeat(B)
    lanes_rng = CounterRNG(seeds.repeat_interleave(K), lanes, shared)
    plan = cfg.plan()
    wants_proposal = bool(getattr(scorer, "uses_proposal", False))
    grid = uniform_grid(cfg.teacher_steps, device)
    x = path.sample_source((B, seq_len), rng)
    states = [x]
    energies = torch.zeros(B, S, K, dtype=torch.float32, device=device)
    chosen = torch.zeros(B, S, dtype=torch.long, device=device)
    counters = Counters(
        extra={"compass_calls": 0, "compass_rows": 0, "compass_seconds": 0.0, "candidates": 0}
    )
    cache = None
    for k in range(S):
        seg = grid[k * n : (k + 1) * n + 1]
        if shaped[k]:
            rows = torch.arange(B, device=device).repeat_interleave(K)
            cache_k = cache.select(rows) if cache is not None else None
            log_q = (
                torch.zeros(B * K, dtype=torch.float64, device=device) if wants_proposal else None
            )
            xk, cache_k = rollout(
                teacher, path, x[rows], seg, lanes_rng, k * n, cache_k, counters, plan, log_q
            )
            e = _score(scorer, xk, float(seg[-1]), counters, log_q).view(B, K)
            j = select(e, cfg, rng, k)
            pick = torch.arange(B, device=device) * K + j
            x = xk[pick]
            cache = cache_k.select(pick)
            energies[:, k] = e
            chosen[:, k] = j
            counters.extra["candidates"] += B * K
        else:
            x, cache = rollout(teacher, path, x, seg, rng, k * n, cache, counters, plan)
        states.append(x)
    return NavigationResult(
        times=grid[::n].clone(),
        states=torch.stack(states, dim=1),
        energies=energies,
        chosen=chosen,
        shaped=torch.tensor(shaped, dtype=torch.bool),
        counters=counters,
    )


def _score(
    scorer: Scorer,
    x: torch.Tensor,
    t: float,
    counters: Counters,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    start = time.perf_counter()
    e = (scorer.energy(x, t) if log_q is None else scorer.energy(x, t, log_q=log_q)).float()
    counters.extra["compass_seconds"] += time.perf_counter() - start
    counters.extra["compass_calls"] += 1
    counters.extra["compass_rows"] += x.shape[0]
    if not torch.isfinite(e).all():
        raise FloatingPointError("the compass returned non-finite energies")
    return e
