"""``tsdfm-pipeline sample``: unconditional samples of a teacher or student, decoded to text.

A student samples on its own grid: S steps of h = 1/S, or the dataset grid it was distilled on
(``provenance.times``) when asked for that S. A teacher samples N uniform steps. Sample i has
seed ``seed · 2^32 + i`` and all randomness is counter-based, so a sample does not depend on
the batch it was drawn in. Temperature T divides the logits before every draw
(``tsdfm.models.solver.TemperedDenoiser``); T = 1 is the model itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tsdfm.models.checkpoint import Checkpoint
from tsdfm.models.errors import ConfigError
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.solver import RevealPlan, check_temperature, sample

TEACHER_DEFAULT_STEPS = 1024


@dataclass(frozen=True)
class Samples:
    """Samples and how they were made.

    Attributes:
        tokens: (n, L) int64 final sequences x_1.
        texts: decoded sequences (None without a tokenizer).
        seeds: (n,) per-sample seeds.
        steps: the step count sampled with.
        seconds: wall time of the sampler.
        row_forwards: per-sequence forward passes run.
        temperature: T of the draws (logits / T); 1 is the model itself.
        order: the reveal order sampled with (``tsdfm.models.solver.RevealPlan``).
    """

    tokens: torch.Tensor
    texts: list[str] | None
    seeds: torch.Tensor
    steps: int
    seconds: float
    row_forwards: int
    temperature: float = 1.0
    order: str = "random"


def default_order(ckpt: Checkpoint) -> str:
    """A student's reveal order is its dataset's (it learned the states of that order); a
    teacher's is the path's own random order."""
    if ckpt.config.role == "student":
        return str(ckpt.config.provenance.get("reveal_order", "random"))
    return "random"


def default_steps(ckpt: Checkpoint) -> int:
    """A student's own S (from its provenance); 1024 for a teacher."""
    if ckpt.config.role == "student":
        return int(ckpt.config.provenance.get("student_steps", 8))
    return TEACHER_DEFAULT_STEPS


def _grid(ckpt: Checkpoint, steps: int, device) -> torch.Tensor | None:
    times = ckpt.config.provenance.get("times")
    if ckpt.config.role == "student" and times and len(times) == steps + 1:
        return torch.tensor(times, dtype=torch.float64, device=device)
    return None


def decode(ckpt: Checkpoint, tokens: torch.Tensor) -> list[str] | None:
    """Text of each row: the synthetic language's words, or the tokenizer's decoding cut at the
    first end-of-sequence token."""
    mc = ckpt.config
    language_file = ckpt.data_file() if mc.data.get("kind") == "synthetic" else None
    if language_file is not None and language_file.is_file():
        from tsdfm.models.data.sources import load_language

        language = load_language(ckpt.directory, mc.data)
        return [language.decode(row, mc.mask_token_id) for row in tokens]
    if ckpt.tokenizer is None:
        return None
    eos = mc.special_tokens.get("eos")
    texts = []
    for row in tokens.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(ckpt.tokenizer.decode(row, skip_special_tokens=False))
    return texts


@torch.no_grad()
def sample_checkpoint(
    ckpt: Checkpoint,
    num_samples: int,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    temperature: float = 1.0,
    order: str | None = None,
) -> Samples:
    """Draw ``num_samples`` unconditional samples with the step-size-aware jump-rule sampler,
    every draw from softmax(logits / ``temperature``), revealing in ``order`` (None: the
    checkpoint's own, :func:`default_order`)."""
    if num_samples < 1 or batch_size < 1:
        raise ConfigError("num_samples and batch_size must be positive integers")
    temperature = check_temperature(temperature)
    steps = default_steps(ckpt) if steps is None else steps
    if steps < 1:
        raise ConfigError(f"steps={steps} must be a positive integer")
    mc = ckpt.config
    order = default_order(ckpt) if order is None else order
    RevealPlan(order).check(mc.path())
    model = ckpt.model.to(device).eval()
    path = mc.path()
    grid = _grid(ckpt, steps, device)
    seeds = trajectory_seed(seed, torch.arange(num_samples, dtype=torch.long))
    xs, forwards = [], 0
    t0 = time.perf_counter()
    for lo in range(0, num_samples, batch_size):
        batch = seeds[lo : lo + batch_size].to(device)
        res = sample(model, path, batch, mc.seq_len, steps, grid, temperature, order)
        xs.append(res.x_1.cpu())
        forwards += res.counters.row_forwards
    seconds = time.perf_counter() - t0
    tokens = torch.cat(xs)
    return Samples(
        tokens, decode(ckpt, tokens), seeds, steps, seconds, forwards, temperature, order
    )
