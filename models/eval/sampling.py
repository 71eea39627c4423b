"""The one sampler of a checkpoint: ``tsdfm-pipeline sample``, ``eval`` and the benchmarks.

:func:`draw` is the sampler every reader of a teacher or student goes through (the ``sample``
command via :func:`sample_checkpoint`, ``eval`` via ``tsdfm.models.eval.evaluate``), so the
same model, seeds, steps, temperature and order give the same tokens everywhere. Its policy:

- steps: a student's own S (``provenance.student_steps``) by default, a teacher's 1024
  (:func:`default_steps`);
- grid (:func:`student_grid`): a student asked for its own S samples on the dataset grid it
  was distilled on (``provenance.times``, t_0 = 0 < … < t_S = 1, h_k = t_{k+1} − t_k); any
  other step count, and every teacher, on the uniform grid t_j = j / n;
- order: a student's dataset's reveal order, a teacher's random order (:func:`default_order`);
- temperature T divides the logits before every draw (``tsdfm.models.solver.TemperedDenoiser``);
  T = 1 is the model itself.

Sample i has seed ``seed · 2^32 + i`` (``tsdfm.models.rng.trajectory_seed``) and all randomness
is counter-based, so a sample does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tsdfm.models.checkpoint import Checkpoint
from tsdfm.models.errors import ConfigError
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.solver import Counters, RevealPlan, check_temperature, sample

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


def student_grid(ckpt: Checkpoint, steps: int, device=None) -> torch.Tensor | None:
    """The grid a checkpoint samples ``steps`` steps on: a student's dataset grid
    (``provenance.times``, (S+1,) float64) when ``steps`` is its S; None (the uniform grid
    t_j = j / steps) otherwise and for a teacher."""
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


@dataclass(frozen=True)
class Drawn:
    """What :func:`draw` returns.

    Attributes:
        tokens: (n, L) int64 final sequences x_1, on the CPU, in seed order.
        steps: the step count sampled with.
        temperature: T of the draws.
        order: the reveal order sampled with.
        seconds: wall time of the sampler (batches included, nothing else).
        counters: forward calls, per-sequence forward passes and steps, summed over batches.
    """

    tokens: torch.Tensor
    steps: int
    temperature: float
    order: str
    seconds: float
    counters: Counters


@torch.no_grad()
def draw(
    ckpt: Checkpoint,
    seeds: torch.Tensor,
    steps: int | None = None,
    temperature: float = 1.0,
    order: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Drawn:
    """Unconditional samples of a teacher or student under the policy of the module docstring.

    Args:
        ckpt: the generator (role teacher or student).
        seeds: (n,) int64 per-sample seeds (``trajectory_seed(seed, arange(n))``).
        steps: sampler steps; None is :func:`default_steps`.
        temperature: T > 0 of every draw, softmax(logits / T).
        order: reveal order; None is :func:`default_order`.
        batch_size: samples per batched rollout (the result does not depend on it).
        device: where to sample.
        progress: called as progress(done, n) after each batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")
    temperature = check_temperature(temperature)
    steps = default_steps(ckpt) if steps is None else steps
    if steps < 1:
        raise ConfigError(f"steps={steps} must be a positive integer")
    mc = ckpt.config
    path = mc.path()
    order = default_order(ckpt) if order is None else order
    RevealPlan(order).check(path)
    model = ckpt.model.to(device).eval()
    grid = student_grid(ckpt, steps, device)
    xs, counters, seconds = [], Counters(), 0.0
    n = len(seeds)
    for lo in range(0, n, batch_size):
        batch = seeds[lo : lo + batch_size].to(device)
        t0 = time.perf_counter()
        res = sample(model, path, batch, mc.seq_len, steps, grid, temperature, order)
        seconds += time.perf_counter() - t0
        counters.add(res.counters)
        xs.append(res.x_1.cpu())
        if progress:
            progress(lo + len(batch), n)
    tokens = torch.cat(xs) if xs else torch.empty((0, mc.seq_len), dtype=torch.long)
    return Drawn(tokens, steps, temperature, order, seconds, counters)


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
    """Draw ``num_samples`` unconditional samples with :func:`draw` (seeds
    ``seed · 2^32 + i``) and decode them: the ``sample`` command."""
    if num_samples < 1 or batch_size < 1:
        raise ConfigError("num_samples and batch_size must be positive integers")
    seeds = trajectory_seed(seed, torch.arange(num_samples, dtype=torch.long))
    d = draw(ckpt, seeds, steps, temperature, order, batch_size, device)
    return Samples(
        d.tokens,
        decode(ckpt, d.tokens),
        seeds,
        d.steps,
        d.seconds,
        d.counters.row_forwards,
        d.temperature,
        d.order,
    )


def open_model(
    spec, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> Checkpoint:
    """A generator to sample or evaluate: this project's teacher or student, an adapter
    teacher (``tsdfm.models.teachers.open_teacher``) or an adapter student saved by
    ``distill`` (``tsdfm.models.teachers.student``); a remote-code teacher (MDLM, Duo) or its
    student only with ``trust_remote_code``."""
    from tsdfm.models.checkpoint import resolve
    from tsdfm.models.teachers import open_teacher
    from tsdfm.models.teachers.student import is_adapter_student, load_adapter_student

    if is_adapter_student(resolve(spec)):
        return load_adapter_student(spec, device, trust_remote_code=trust_remote_code)
    return open_teacher(
        spec, device, role=("teacher", "student"), trust_remote_code=trust_remote_code
    )
