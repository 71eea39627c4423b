"""``tsdfm-pipeline eval``: unconditional samples at several step counts and temperatures, scored
by an evaluator.

Every (step count, temperature T) pair is an arm; its samples come from the one sampler,
``tsdfm.models.eval.sampling.draw`` (the ``sample`` command's: a student at its own S on its
dataset grid, draws from softmax(logits / T), T = 1 the model itself), with the same seeds in
every arm, so an arm's tokens are those ``tsdfm-pipeline sample`` prints for that seed, step
count, temperature and order. For each arm the report holds the token-weighted generative
perplexity under the chosen evaluator (``tsdfm.models.eval.evaluators``; which tokens weight it
is in ``evaluator_info.tokens``),
the mean and sd of per-sample unigram entropy (nats, over the generator's L tokens), distinct-n
for n = 1..4 (per-sample mean and over the whole set, generator tokens), NFE (steps, and
per-sequence forward passes actually run) and seconds per sample; the same figures (but speed)
for real data: fresh sequences of the synthetic language, or windows of a reference text for a
text checkpoint; and, for the synthetic language, the true perplexity exp(H/L).

Temperature trades perplexity for entropy (a sharper sampler has lower gen-PPL *and* lower
entropy), so two generators are compared at matched entropy: per step count, the arms'
(T, gen-PPL, entropy) points form a *frontier*, and :func:`gen_ppl_at_entropy` reads the
gen-PPL of that frontier at a given entropy.
"""

from __future__ import annotations

import itertools
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tsdfm.models.checkpoint import Checkpoint
from tsdfm.models.errors import ConfigError, DataError
from tsdfm.models.eval.metrics import (
    Evaluator,
    ExactEvaluator,
    distinct_n,
    generative_perplexity,
    unigram_entropy,
)
from tsdfm.models.eval.sampling import decode as decode_samples
from tsdfm.models.eval.sampling import default_order, draw
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.solver import RevealPlan, check_temperature

DISTINCT_ORDERS = (1, 2, 3, 4)
METRICS = {
    "gen_ppl": "exp(sum of NLL / sum of counted tokens) over all samples (token-weighted)",
    "tokens_scored": "tokens counted in gen_ppl (evaluator_info.tokens says whose tokens)",
    "entropy_mean": "mean per-sample unigram entropy (nats) of the generator's L tokens",
    "distinct": "mean per-sample fraction of unique n-grams of generator tokens, n = 1..4",
    "distinct_set": "fraction of unique n-grams over all samples together, n = 1..4",
    "temperature": "T of the sampler's draws, softmax(logits / T); 1 is the model itself",
    "nfe": "sampler steps (network evaluations per sequence without caching)",
    "forwards_per_sample": "per-sequence forward passes actually run",
    "seconds_per_sample": "sampler wall time / samples (scoring excluded)",
}


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate.

    Args:
        steps: step counts to sample with.
        samples: samples per arm (≥ 1,000 for reported numbers).
        batch_size: samples per batched rollout.
        seed: sample i has seed ``seed * 2**32 + i`` (the same seeds in every arm).
        temperatures: sampler temperatures T > 0; every (steps, T) pair is an arm.
        match_entropy: entropies (nats) at which to read each step count's frontier
            (:func:`gen_ppl_at_entropy`).
        order: reveal order of the sampler (``tsdfm.models.solver.RevealPlan``); None is the
            checkpoint's own (``tsdfm.models.eval.sampling.default_order``: a student's dataset's).
    """

    steps: tuple[int, ...] = (1024, 8)
    samples: int = 1000
    batch_size: int = 250
    seed: int = 0
    temperatures: tuple[float, ...] = (1.0,)
    match_entropy: tuple[float, ...] = ()
    order: str | None = None

    def __post_init__(self) -> None:
        if self.order is not None:
            RevealPlan(self.order)  # validates the name
        if not self.steps or any(s < 1 for s in self.steps):
            raise ConfigError(f"steps {list(self.steps)} must be positive integers")
        if self.samples < 1 or self.batch_size < 1:
            raise ConfigError("samples and batch_size must be positive integers")
        if not self.temperatures:
            raise ConfigError("temperatures is empty; pass at least one T (1.0: the model itself)")
        temps = tuple(check_temperature(t) for t in self.temperatures)
        if len(set(temps)) != len(temps):
            raise ConfigError(f"temperatures {list(temps)} repeat a value; list each T once")
        object.__setattr__(self, "temperatures", temps)
        entropies = tuple(float(h) for h in self.match_entropy)
        if any(not (math.isfinite(h) and h >= 0) for h in entropies):
            raise ConfigError(
                f"match_entropy {list(entropies)}: each must be an entropy in nats, ≥ 0"
            )
        object.__setattr__(self, "match_entropy", entropies)


@dataclass
class ArmResult:
    """Figures for one way of producing sequences (see ``METRICS``)."""

    name: str
    steps: int | None
    samples: int
    gen_ppl: float
    entropy_mean: float
    entropy_sd: float
    temperature: float | None = None
    order: str | None = None
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
    temperature: float | None = None,
    order: str | None = None,
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
        temperature: the sampler's T, None for real data.
        order: the sampler's reveal order, None for real data.
    """
    nll, n_tok = evaluator.nll(x)
    ent = unigram_entropy(x, vocab_size)
    n, L = x.shape
    per, whole = {}, {}
    for n_gram in DISTINCT_ORDERS:
        if n_gram <= L:
            d, d_set = distinct_n(x, n_gram)
            per[str(n_gram)], whole[str(n_gram)] = float(d.mean()), d_set
    texts = decode(x[:3]) if decode is not None else None
    return ArmResult(
        name=name,
        steps=steps,
        samples=n,
        gen_ppl=generative_perplexity(nll, n_tok),
        entropy_mean=float(ent.mean()),
        entropy_sd=float(ent.std()) if n > 1 else 0.0,
        temperature=temperature,
        order=order,
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
    from tsdfm.models.data.corpus import CorpusConfig, TokenizedCorpus

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
    """Sample a teacher or student at each (step count, temperature) and score the samples.

    Args:
        ckpt: the generator.
        cfg: step counts, temperatures, samples, seed, entropies to read the frontier at.
        device: where to sample.
        progress: called as progress(label, done, total) after each batch.
        evaluator: loaded once with ``tsdfm.models.eval.evaluators.load_evaluator`` (bound to
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
        from tsdfm.models.data.sources import load_language

        language = load_language(ckpt.directory, mc.data)
    elif reference is not None and (reference.dim() != 2 or reference.shape[1] != mc.seq_len):
        raise DataError(
            f"reference rows must have shape (n, {mc.seq_len}), got {tuple(reference.shape)}"
        )
    model = ckpt.model.to(device).eval()
    path = mc.path()
    vocab = mc.input_vocab
    order = cfg.order if cfg.order is not None else default_order(ckpt)
    RevealPlan(order).check(path)

    def decode(rows: torch.Tensor) -> list[str] | None:
        return decode_samples(ckpt, rows)

    arms = []
    for steps, temperature in itertools.product(cfg.steps, cfg.temperatures):
        label = f"{steps} steps" + ("" if temperature == 1.0 else f" T={temperature:g}")
        seeds = trajectory_seed(cfg.seed, torch.arange(cfg.samples, dtype=torch.long))
        drawn = draw(
            ckpt,
            seeds,
            steps,
            temperature,
            order,
            cfg.batch_size,
            device,
            None if progress is None else (lambda done, n, label=label: progress(label, done, n)),
        )
        arms.append(
            describe_samples(
                arm_name(mc.role, steps, temperature, order),
                drawn.tokens,
                evaluator,
                vocab,
                steps=steps,
                row_forwards=drawn.counters.row_forwards,
                seconds=drawn.seconds,
                decode=decode,
                temperature=temperature,
                order=order,
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
        "sampler": "ancestral jump rule, float64 inverse-CDF draws from softmax(logits / T) at "
        "each arm's temperature T (T = 1: the model itself), no nucleus; "
        f"reveal order {order}",
        "order": order,
        "metrics": METRICS,
        "device": _device_info(device),
        "arms": [asdict(a) for a in arms],
        "frontier": frontier_report(arms, cfg.match_entropy),
        "real_data": real,
    }


def arm_name(role: str, steps: int, temperature: float, order: str = "random") -> str:
    """The arm's label: "teacher 8 steps", with ", T=0.8" away from T = 1 and ", dilated"
    for a reveal order other than the random one."""
    name = f"{role} {steps} steps" + ("" if temperature == 1.0 else f", T={temperature:g}")
    return name + ("" if order == "random" else f", {order}")


# the frontier ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontierPoint:
    """One arm on a step count's temperature frontier."""

    temperature: float
    gen_ppl: float
    entropy_mean: float


def frontier(arms: Sequence[ArmResult]) -> dict[int, list[FrontierPoint]]:
    """Per step count, its arms' (T, gen-PPL, entropy) points sorted by entropy (then by T).

    Args:
        arms: sampled arms (real data, with ``steps`` None, is left out).

    Returns:
        {steps: points} in the arms' order of step counts.
    """
    out: dict[int, list[FrontierPoint]] = {}
    for a in arms:
        if a.steps is None:
            continue
        t = 1.0 if a.temperature is None else a.temperature
        out.setdefault(a.steps, []).append(FrontierPoint(t, a.gen_ppl, a.entropy_mean))
    return {s: sorted(pts, key=lambda p: (p.entropy_mean, p.temperature)) for s, pts in out.items()}


def gen_ppl_at_entropy(points: Sequence[FrontierPoint], entropy: float) -> float | None:
    """The frontier's gen-PPL at unigram entropy H, interpolated, never extrapolated.

    With the points sorted by entropy, H between the entropies e_a ≤ H ≤ e_b of two neighbours
    (a, b) gives

        log PPL(H) = log PPL_a + (H − e_a) / (e_b − e_a) · (log PPL_b − log PPL_a),

    i.e. log gen-PPL is linear in entropy between the two bracketing points (perplexity is
    exp of a mean NLL, so this interpolates the NLL linearly). A point at exactly H gives its
    own gen-PPL (several points at that entropy: the geometric mean of theirs). H outside
    [min e, max e] of the points, or no points, gives None: the frontier says nothing there.

    Args:
        points: FrontierPoint-like objects (``gen_ppl``, ``entropy_mean``), in any order.
        entropy: H in nats.
    """
    pts = sorted(points, key=lambda p: p.entropy_mean)
    if not pts or not math.isfinite(entropy):
        return None
    if not pts[0].entropy_mean <= entropy <= pts[-1].entropy_mean:
        return None
    at = [p.gen_ppl for p in pts if p.entropy_mean == entropy]
    if len(at) == 1:
        return at[0]
    if at:
        return math.exp(sum(map(math.log, at)) / len(at))
    for a, b in itertools.pairwise(pts):
        if a.entropy_mean < entropy < b.entropy_mean:
            w = (entropy - a.entropy_mean) / (b.entropy_mean - a.entropy_mean)
            return math.exp((1 - w) * math.log(a.gen_ppl) + w * math.log(b.gen_ppl))
    raise AssertionError("an entropy inside the range lies between two points")


def frontier_report(arms: Sequence[ArmResult], match_entropy: Sequence[float] = ()) -> list[dict]:
    """The report's ``frontier`` section: per step count its points and, for each H of
    ``match_entropy``, the interpolated gen-PPL (None outside the frontier's range)."""
    return [
        {
            "steps": steps,
            "points": [asdict(p) for p in pts],
            "at_entropy": [
                {"entropy": h, "gen_ppl": gen_ppl_at_entropy(pts, h)} for h in match_entropy
            ],
        }
        for steps, pts in frontier(arms).items()
    ]


@dataclass(frozen=True)
class EntropyMatch:
    """Result of :func:`temperature_for_entropy`.

    Attributes:
        temperature: the tried T whose entropy came closest to the target.
        entropy: its entropy.
        tried: every (T, entropy) known or evaluated, in the order learnt.
        evaluations: new evaluations run (≤ the budget).
        converged: |entropy − target| < tolerance.
    """

    temperature: float
    entropy: float
    tried: tuple[tuple[float, float], ...]
    evaluations: int
    converged: bool


def temperature_for_entropy(
    entropy_at: Callable[[float], float],
    target: float,
    lo: float = 0.3,
    hi: float = 1.0,
    budget: int = 6,
    tolerance: float = 0.005,
    known: dict[float, float] | None = None,
) -> EntropyMatch:
    """The T in [lo, hi] whose samples have unigram entropy ``target``, by bisection.

    Assumes entropy rises with T (sharper draws repeat tokens). Each step evaluates the
    midpoint T_m = (lo + hi) / 2 and keeps the half whose ends bracket the target; it stops at
    |H(T) − target| < tolerance or after ``budget`` evaluations and returns the closest T
    tried. A known endpoint beyond the target ends the search there: H(hi) < target means no T
    in range reaches it, and so does H(lo) > target.

    Args:
        entropy_at: T → mean unigram entropy of the samples at T (the costly evaluation).
        target: the entropy to match (nats).
        lo, hi: the search range of T, 0 < lo < hi.
        budget: the most evaluations to run.
        tolerance: close enough (nats).
        known: entropies already measured, e.g. {1.0: H(1)}; they cost no evaluation.
    """
    assert 0 < lo < hi and tolerance > 0 and (budget >= 1 or known), "nothing to search with"
    tried = dict(known or {})
    evaluations = 0

    def best() -> tuple[float, float]:
        return min(tried.items(), key=lambda kv: (abs(kv[1] - target), -kv[0]))

    def done() -> bool:
        return bool(tried) and abs(best()[1] - target) < tolerance

    blocked = (hi in tried and tried[hi] < target) or (lo in tried and tried[lo] > target)
    while not blocked and not done() and evaluations < budget:
        mid = (lo + hi) / 2
        tried[mid] = float(entropy_at(mid))
        evaluations += 1
        if tried[mid] < target:
            lo = mid
        else:
            hi = mid
    temperature, entropy = best()
    return EntropyMatch(
        temperature, entropy, tuple(tried.items()), evaluations, abs(entropy - target) < tolerance
    )


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
    head = ["arm", "steps (NFE)", "T", "gen-PPL"]
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
            "-" if arm.get("temperature") is None else f"{arm['temperature']:g}",
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


def format_matches(report: dict) -> list[str]:
    """One line per (step count, entropy) read off the frontier (``--match-entropy``)."""
    lines = []
    for section in report.get("frontier", []):
        pts = section["points"]
        lo, hi = pts[0]["entropy_mean"], pts[-1]["entropy_mean"]
        for m in section["at_entropy"]:
            head = f"{section['steps']} steps at entropy {m['entropy']:.3f} nats: "
            if m["gen_ppl"] is None:
                lines.append(
                    head + f"outside the frontier's entropies [{lo:.3f}, {hi:.3f}]; add "
                    "temperatures that bracket it"
                )
            else:
                lines.append(head + f"gen-PPL {m['gen_ppl']:.3f} (interpolated)")
    return lines
