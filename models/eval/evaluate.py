"""``tsdfm-pipeline eval``: unconditional samples at several step counts, scored by an evaluator.

For each step count the report holds the token-weighted generative perplexity under the chosen
evaluator (``models.eval.evaluators``; which tokens weight it is in ``evaluator_info.tokens``),
the mean and sd of per-sample unigram entropy (nats, over the generator's L tokens), distinct-n
for n = 1..4 (per-sample mean and over the whole set, generator tokens), NFE (steps, and
per-sequence forward passes actually run) and seconds per sample; the same figures (but speed)
for real data: fresh sequences of the synthetic language, or windows of a reference text for a
text checkpoint; and, for the synthetic language, the true perplexity exp(H/L).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from models.checkpoint import Checkpoint
from models.errors import ConfigError, DataError
from models.eval.metrics import (
    Evaluator,
    ExactEvaluator,
    distinct_n,
    generative_perplexity,
    unigram_entropy,
)
from models.eval.sampling import decode as decode_samples
from models.solver import Counters, sample

DISTINCT_ORDERS = (1, 2, 3, 4)
METRICS = {
    "gen_ppl": "exp(sum of NLL / sum of counted tokens) over all samples (token-weighted)",
    "tokens_scored": "tokens counted in gen_ppl (evaluator_info.tokens says whose tokens)",
    "entropy_mean": "mean per-sample unigram entropy (nats) of the generator's L tokens",
    "distinct": "mean per-sample fraction of unique n-grams of generator tokens, n = 1..4",
    "distinct_set": "fraction of unique n-grams over all samples together, n = 1..4",
    "nfe": "sampler steps (network evaluations per sequence without caching)",
    "forwards_per_sample": "per-sequence forward passes actually run",
    "seconds_per_sample": "sampler wall time / samples (scoring excluded)",
}


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate.

    Args:
        steps: step counts to sample with.
        samples: samples per step count (≥ 1,000 for reported numbers).
        batch_size: samples per batched rollout.
        seed: sample i has seed ``seed * 2**32 + i``.
    """

    steps: tuple[int, ...] = (1024, 8)
    samples: int = 1000
    batch_size: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.steps or any(s < 1 for s in self.steps):
            raise ConfigError(f"steps {list(self.steps)} must be positive integers")
        if self.samples < 1 or self.batch_size < 1:
            raise ConfigError("samples and batch_size must be positive integers")


@dataclass
class ArmResult:
    """Figures for one way of producing sequences (see ``METRICS``)."""

    name: str
    steps: int | None
    samples: int
    gen_ppl: float
    entropy_mean: float
    entropy_sd: float
    nfe: int | None = None
    forwards_per_sample: float | None = None
    seconds_per_sample: float | None = None
    tokens_scored: int = 0
    distinct: dict[str, float] = field(default_factory=dict)
    distinct_set: dict[str, float] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def describe_samples(
    name: str,
    x: torch.Tensor,
    evaluator: Evaluator,
    vocab_size: int,
    *,
    steps: int | None = None,
    row_forwards: int | None = None,
    seconds: float | None = None,
    decode: Callable[[torch.Tensor], list[str] | None] | None = None,
) -> ArmResult:
    """Score a set of samples (any sampler: teacher, student, best-of-K) into an ArmResult.

    Args:
        name: label of the arm.
        x: (n, L) int64 final sequences x_1.
        evaluator: an evaluator already bound to the generator (``evaluator.bind(ckpt)``).
        vocab_size: ids lie in [0, vocab_size) (the generator's input vocabulary).
        steps: sampler steps (NFE), None for real data.
        row_forwards: per-sequence forward passes the sampler ran, if counted.
        seconds: sampler wall time, if measured.
        decode: rows → texts for the three examples kept in the report.
    """
    nll, n_tok = evaluator.nll(x)
    ent = unigram_entropy(x, vocab_size)
    n, L = x.shape
    per, whole = {}, {}
    for order in DISTINCT_ORDERS:
        if order <= L:
            d, d_set = distinct_n(x, order)
            per[str(order)], whole[str(order)] = float(d.mean()), d_set
    texts = decode(x[:3]) if decode is not None else None
    return ArmResult(
        name=name,
        steps=steps,
        samples=n,
        gen_ppl=generative_perplexity(nll, n_tok),
        entropy_mean=float(ent.mean()),
        entropy_sd=float(ent.std()) if n > 1 else 0.0,
        nfe=steps,
        forwards_per_sample=None if row_forwards is None else row_forwards / n,
        seconds_per_sample=None if seconds is None else seconds / n,
        tokens_scored=int(n_tok.sum()),
        distinct=per,
        distinct_set=whole,
        examples=texts or [],
    )


def reference_windows(path: str | Path, ckpt: Checkpoint, samples: int, seed: int) -> torch.Tensor:
    """Real-data rows for a text checkpoint: ``samples`` windows of L tokens of the text at
    ``path`` (a .txt file or a folder of them), cut with the checkpoint's own tokenizer exactly
    as its training corpus was, chosen by a permutation seeded with ``seed + 1``. Use held-out
    text: the figures are those of the data the samples should look like."""
    from models.data.corpus import CorpusConfig, TokenizedCorpus

    mc = ckpt.config
    if mc.data.get("kind") == "synthetic":
        raise ConfigError(
            f"{ckpt.spec} is a synthetic-language checkpoint; its real data is the language "
            "itself, so drop --reference"
        )
    if ckpt.tokenizer is None:
        raise ConfigError(f"{ckpt.spec} has no tokenizer to cut reference text with")
    corpus = TokenizedCorpus.from_path(path, ckpt.tokenizer, CorpusConfig(seq_len=mc.seq_len))
    perm = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed + 1))
    return corpus.windows[perm[:samples].sort().values]


@torch.no_grad()
def evaluate_checkpoint(
    ckpt: Checkpoint,
    cfg: EvalConfig,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
    evaluator: Evaluator | None = None,
    reference: torch.Tensor | None = None,
) -> dict:
    """Sample a teacher or student at each of ``cfg.steps`` and score the samples.

    Args:
        ckpt: the generator.
        cfg: step counts, samples, seed.
        device: where to sample.
        progress: called as progress(label, done, total) after each batch.
        evaluator: loaded once with ``models.eval.evaluators.load_evaluator`` (bound to
            ``ckpt`` here); None is the exact likelihood, which only synthetic checkpoints have.
        reference: (n, L) real-data rows of a text checkpoint (:func:`reference_windows`); the
            synthetic language draws its own.

    Returns:
        A JSON-able report (see the module docstring).
    """
    mc = ckpt.config
    evaluator = (evaluator if evaluator is not None else ExactEvaluator()).bind(ckpt)
    synthetic = mc.data.get("kind") == "synthetic"
    language = None
    if synthetic:
        from models.train.teacher import load_language

        language = load_language(ckpt.directory, mc.data)
    elif reference is not None and (reference.dim() != 2 or reference.shape[1] != mc.seq_len):
        raise DataError(
            f"reference rows must have shape (n, {mc.seq_len}), got {tuple(reference.shape)}"
        )
    model = ckpt.model.to(device).eval()
    path = mc.path()
    vocab = mc.input_vocab

    def decode(rows: torch.Tensor) -> list[str] | None:
        return decode_samples(ckpt, rows)

    arms = []
    for steps in cfg.steps:
        xs, counters, seconds = [], Counters(), 0.0
        for start in range(0, cfg.samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.samples - start)
            seeds = torch.arange(start, start + n, dtype=torch.long) + cfg.seed * 2**32
            t0 = time.perf_counter()
            res = sample(model, path, seeds.to(device), mc.seq_len, steps)
            seconds += time.perf_counter() - t0
            counters.add(res.counters)
            xs.append(res.x_1.cpu())
            if progress:
                progress(f"{steps} steps", start + n, cfg.samples)
        arms.append(
            describe_samples(
                f"{mc.role} {steps} steps",
                torch.cat(xs),
                evaluator,
                vocab,
                steps=steps,
                row_forwards=counters.row_forwards,
                seconds=seconds,
                decode=decode,
            )
        )
    if language is not None:
        reference = language.sample(cfg.samples, torch.Generator().manual_seed(cfg.seed + 1))
    real = (
        None
        if reference is None
        else asdict(describe_samples("real data", reference.cpu(), evaluator, vocab, decode=decode))
    )
    return {
        "model": {
            "spec": ckpt.spec,
            "identity": ckpt.identity,
            "role": mc.role,
            "source": mc.source,
            "data": mc.data.get("kind"),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "evaluator": evaluator.name,
        "evaluator_info": evaluator.describe(),
        "true_perplexity": None if language is None else language.perplexity(),
        "true_entropy_per_token": None if language is None else language.entropy_per_token(),
        "config": asdict(cfg),
        "sampler": "ancestral jump rule, float64 inverse-CDF draws, no temperature, no nucleus",
        "metrics": METRICS,
        "device": _device_info(device),
        "arms": [asdict(a) for a in arms],
        "real_data": real,
    }


def _device_info(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table_header(report: dict) -> list[str]:
    """Columns of :func:`format_table` (no ratio to the truth without a true perplexity)."""
    head = ["arm", "steps (NFE)", "gen-PPL"]
    if report.get("true_perplexity") is not None:
        head.append("× true PPL")
    return [
        *head,
        "unigram entropy (nats)",
        "distinct-1/2/3/4",
        "forwards/sample",
        "s/sample",
    ]


def format_table(report: dict) -> list[list[str]]:
    """Rows of the eval table (columns: :func:`table_header`)."""
    truth = report.get("true_perplexity")
    rows = []
    arms = report["arms"] + ([report["real_data"]] if report.get("real_data") else [])
    for arm in arms:
        row = [
            arm["name"],
            "-" if arm["steps"] is None else str(arm["steps"]),
            f"{arm['gen_ppl']:.3f}",
        ]
        if truth is not None:
            row.append(f"{arm['gen_ppl'] / truth:.3f}")
        distinct = arm.get("distinct") or {}
        row += [
            f"{arm['entropy_mean']:.3f} ± {arm['entropy_sd']:.3f}",
            "/".join(f"{distinct[k]:.2f}" for k in sorted(distinct)) or "-",
            "-" if arm["forwards_per_sample"] is None else f"{arm['forwards_per_sample']:.1f}",
            "-" if arm["seconds_per_sample"] is None else f"{arm['seconds_per_sample']:.4f}",
        ]
        rows.append(row)
    return rows


TABLE_HEADER = table_header({"true_perplexity": 1.0})
