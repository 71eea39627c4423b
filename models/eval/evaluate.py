"""``tsdfm-pipeline eval``: unconditional samples at several step counts, scored by an evaluator.

For each step count the report holds the token-weighted generative perplexity, the mean and sd of
per-sample unigram entropy, NFE (steps, and per-sequence forward passes actually run), and
seconds per sample; the same figures (but speed) for real data where the evaluator has a
data sampler; and, for the synthetic language, the true perplexity exp(H/L).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from models.checkpoint import Checkpoint
from models.errors import ConfigError
from models.eval.metrics import ExactEvaluator, generative_perplexity, unigram_entropy
from models.solver import Counters, sample
from models.train.teacher import load_language


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
    """Figures for one way of producing sequences."""

    name: str
    steps: int | None
    samples: int
    gen_ppl: float
    entropy_mean: float
    entropy_sd: float
    nfe: int | None = None
    forwards_per_sample: float | None = None
    seconds_per_sample: float | None = None
    examples: list[str] = field(default_factory=list)


def _describe(name, steps, x, evaluator, vocab, counters=None, seconds=None, decode=None):
    nll, n_tok = evaluator.nll(x)
    ent = unigram_entropy(x, vocab)
    n = x.shape[0]
    return ArmResult(
        name=name,
        steps=steps,
        samples=n,
        gen_ppl=generative_perplexity(nll, n_tok),
        entropy_mean=float(ent.mean()),
        entropy_sd=float(ent.std()) if n > 1 else 0.0,
        nfe=steps,
        forwards_per_sample=None if counters is None else counters.row_forwards / n,
        seconds_per_sample=None if seconds is None else seconds / n,
        examples=[decode(row) for row in x[:3]] if decode else [],
    )


@torch.no_grad()
def evaluate_checkpoint(
    ckpt: Checkpoint,
    cfg: EvalConfig,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Evaluate a teacher or student checkpoint trained on the synthetic language.

    Returns a JSON-able report (see module docstring).
    """
    mc = ckpt.config
    if mc.data.get("kind") != "synthetic":
        raise ConfigError(
            f"{ckpt.spec} was trained on {mc.data.get('kind', 'unknown')} data; this version of "
            "eval scores the synthetic language's exact likelihood only"
        )
    language = load_language(ckpt.directory, mc.data)
    evaluator = ExactEvaluator(language)
    model = ckpt.model.to(device).eval()
    path = mc.path()

    def decode(row):
        return language.decode(row, mc.mask_token_id)

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
        x = torch.cat(xs)
        arms.append(
            _describe(
                f"{mc.role} {steps} steps",
                steps,
                x,
                evaluator,
                mc.vocab_size,
                counters,
                seconds,
                decode,
            )
        )
    real = language.sample(cfg.samples, torch.Generator().manual_seed(cfg.seed + 1))
    reference = _describe("real data", None, real, evaluator, mc.vocab_size, decode=decode)
    return {
        "model": {
            "spec": ckpt.spec,
            "identity": ckpt.identity,
            "role": mc.role,
            "source": mc.source,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "evaluator": evaluator.name,
        "true_perplexity": language.perplexity(),
        "true_entropy_per_token": language.entropy_per_token(),
        "config": asdict(cfg),
        "sampler": "ancestral jump rule, float64 inverse-CDF draws, no temperature, no nucleus",
        "device": _device_info(device),
        "arms": [asdict(a) for a in arms],
        "real_data": asdict(reference),
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


def format_table(report: dict) -> list[list[str]]:
    """Rows of the eval table: arm, steps, gen-PPL, ratio to truth, entropy, NFE, s/sample."""
    truth = report["true_perplexity"]
    rows = []
    for arm in [*report["arms"], report["real_data"]]:
        rows.append(
            [
                arm["name"],
                "-" if arm["steps"] is None else str(arm["steps"]),
                f"{arm['gen_ppl']:.3f}",
                f"{arm['gen_ppl'] / truth:.3f}",
                f"{arm['entropy_mean']:.3f} ± {arm['entropy_sd']:.3f}",
                "-" if arm["forwards_per_sample"] is None else f"{arm['forwards_per_sample']:.1f}",
                "-" if arm["seconds_per_sample"] is None else f"{arm['seconds_per_sample']:.4f}",
            ]
        )
    return rows


TABLE_HEADER = [
    "arm",
    "steps (NFE)",
    "gen-PPL",
    "× true PPL",
    "unigram entropy (nats)",
    "forwards/sample",
    "s/sample",
]
