"""``teacher check``: what an adapter detected, and whether the teacher behind it is sound.

Checks, each a number in the report and a CheckpointError when it fails:

* one denoising step: p_1t = softmax(logits) over the V data tokens sums to 1 at every
  position (|Σ p − 1| < 10⁻⁵), never-drawn tokens have p = 0 exactly, and the output has no
  column for [MASK] (shape (B, L, V), mask = V); at a masked position p_1t equals the
  network's own softmax restricted to the drawable tokens and renormalised (the vocabulary
  map is right), and (an adapter under the mask source, SUBS) a revealed position carries
  its token (p = 1); this project's own teachers are free there (the solver never moves a
  revealed token);
* float64 preflight: the network in float64 gives the same p_1t (max |Δp| reported; < 10⁻³
  required), and a few samples drawn in float64 hold data tokens only (no [MASK], no
  never-drawn token); with an evaluator, their gen-PPL = exp(mean token NLL);
* K = 1: the navigator's blind build (``tsdfm.models.navigator.navigate`` with K = 1) gives
  exactly the final states of the N-step teacher sampler (``tsdfm.models.solver.sample``)
  through the same adapter and seeds.

:func:`step_check` is the cheap part (one forward pass) that every build runs on each worker
before its first shard.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from tsdfm.models.checkpoint import Checkpoint
from tsdfm.models.errors import CheckpointError
from tsdfm.models.rng import CounterRNG

SUM_TOL = 1e-5
F64_TOL = 1e-3


def probe_states(ckpt: Checkpoint, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """(B, L) states to probe: row 0 all source, the others with every other position
    revealed to a drawable data token."""
    cfg = ckpt.config
    path = cfg.path()
    device = next(ckpt.model.parameters()).device
    rng = CounterRNG(torch.arange(batch, dtype=torch.long, device=device) + seed)
    x = path.sample_source((batch, cfg.seq_len), rng)
    drawable = [i for i in range(cfg.vocab_size) if i not in set(_never(ckpt))]
    if not drawable:
        raise CheckpointError(f"{ckpt.spec}: every token is special; nothing can be drawn")
    for b in range(1, batch):
        for i in range(0, cfg.seq_len, 2):
            x[b, i] = drawable[(b * 7 + i) % len(drawable)]
    return x


def _never(ckpt: Checkpoint) -> list[int]:
    vocab = getattr(ckpt.model, "vocab", None)
    return vocab.never_internal() if vocab is not None else []


def step_check(ckpt: Checkpoint) -> dict[str, Any]:
    """One denoising step through the adapter (module docstring); raises on a failure."""
    cfg = ckpt.config
    V = cfg.vocab_size
    model = ckpt.model
    x = probe_states(ckpt)
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    with torch.no_grad():
        logits = model(x, t, torch.full_like(t, 0.1))
    problems = []
    if tuple(logits.shape) != (*x.shape, V):
        problems.append(f"output shape {tuple(logits.shape)}, expected {(*x.shape, V)}")
        raise CheckpointError(f"{ckpt.spec}: the denoising step fails ({problems[0]})")
    p = torch.softmax(logits.double(), dim=-1)
    finite = bool(torch.isfinite(logits).all())
    sum_err = float((p.sum(-1) - 1).abs().max())
    never = _never(ckpt)
    never_mass = float(p[..., never].max()) if never else 0.0
    report = {
        "finite": finite,
        "max_sum_error": sum_err,
        "never_drawn_tokens": len(never),
        "never_drawn_max_probability": never_mass,
    }
    if not finite:
        problems.append("logits are not finite")
    if sum_err > SUM_TOL:
        problems.append(f"probabilities sum to 1 ± {sum_err:.2e}")
    if never_mass != 0.0:
        problems.append(f"a never-drawn token has probability {never_mass:.2e}")
    network = getattr(model, "network_logits", None)  # an adapter's network (SUBS)
    if cfg.source == "mask" and network is not None:
        revealed = x != V
        carried = p.gather(-1, x.clamp_max(V - 1).unsqueeze(-1)).squeeze(-1)[revealed]
        report["revealed_carried_min_probability"] = (
            float(carried.min()) if carried.numel() else 1.0
        )
        if carried.numel() and float(carried.min()) < 1 - SUM_TOL:
            problems.append("a revealed position does not keep its token")
    if network is not None:
        with torch.no_grad(), model._autocast(x.device):  # as the forward ran (bf16 on CUDA)
            raw = network(model.vocab.to_model(x), t).double()
        allowed = torch.ones(raw.shape[-1], dtype=torch.bool, device=raw.device)
        allowed[list(model.vocab.never)] = False
        if model.vocab.mask_id is not None:
            allowed[model.vocab.mask_id] = False
        ref_p = torch.softmax(raw.masked_fill(~allowed, -math.inf), dim=-1)
        keep = [j for j in range(raw.shape[-1]) if j != model.vocab.mask_id]
        ref_p = ref_p[..., keep]  # model ids in order, the mask removed = solver ids 0..V−1
        rows = x == V if cfg.source == "mask" else torch.ones_like(x, dtype=torch.bool)
        err = float((ref_p[rows] - p[rows]).abs().max()) if rows.any() else 0.0
        report["max_difference_from_network"] = err
        if err > SUM_TOL:
            problems.append(f"p_1t differs from the network's own softmax by {err:.2e}")
    if problems:
        raise CheckpointError(f"{ckpt.spec}: the denoising step fails ({'; '.join(problems)})")
    return report


def float64_preflight(
    ckpt: Checkpoint, samples: int = 4, steps: int | None = None, evaluator: Any = None
) -> dict[str, Any]:
    """The float64 preflight (module docstring); ``evaluator`` an unbound evaluator or None."""
    from tsdfm.models.solver import sample

    cfg = ckpt.config
    model64 = copy.deepcopy(ckpt.model).double()
    x = probe_states(ckpt)
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    with torch.no_grad():
        p32 = torch.softmax(ckpt.model(x, t, t).double(), -1)
        p64 = torch.softmax(model64(x, t, t).double(), -1)
    diff = float((p32 - p64).abs().max())
    n = steps or cfg.seq_len
    device = x.device
    seeds = torch.arange(samples, dtype=torch.long, device=device)
    x1 = sample(model64, cfg.path(), seeds, cfg.seq_len, n).x_1
    bad = set(_never(ckpt)) | ({cfg.vocab_size} if cfg.source == "mask" else set())
    bad_tokens = int(sum((x1 == j).sum() for j in bad)) if bad else 0
    report = {
        "float32_vs_float64_max_difference": diff,
        "samples": samples,
        "steps": n,
        "non_data_tokens_in_samples": bad_tokens,
        "gen_ppl": None,
    }
    if evaluator is not None:
        bound = evaluator.bind(ckpt)
        nll, count = bound.nll(x1.cpu())
        report["gen_ppl"] = float(math.exp(float(nll.sum()) / max(float(count.sum()), 1.0)))
        report["evaluator"] = getattr(evaluator, "spec", None)
    if ckpt.tokenizer is not None:
        report["example"] = ckpt.tokenizer.decode_batch(x1[:1].tolist(), skip_special_tokens=False)[
            0
        ]
    if not math.isfinite(diff) or diff > F64_TOL:
        raise CheckpointError(f"{ckpt.spec}: float32 and float64 disagree (max |Δp| = {diff:.2e})")
    if bad_tokens:
        raise CheckpointError(f"{ckpt.spec}: samples hold {bad_tokens} mask or special tokens")
    return report


def k1_check(
    ckpt: Checkpoint, samples: int = 2, student_steps: int = 2, teacher_steps: int = 8
) -> dict:
    """Whether a K = 1 build equals the teacher sampler through this adapter (same seeds)."""
    from tsdfm.models.navigator import NavigatorConfig, navigate
    from tsdfm.models.rng import trajectory_seed
    from tsdfm.models.solver import sample

    cfg = ckpt.config
    device = next(ckpt.model.parameters()).device
    seeds = trajectory_seed(0, torch.arange(samples, dtype=torch.long)).to(device)
    nav = NavigatorConfig(student_steps, teacher_steps, 1)
    built = navigate(ckpt.model, None, cfg.path(), seeds, cfg.seq_len, nav).states[:, -1]
    sampled = sample(ckpt.model, cfg.path(), seeds, cfg.seq_len, teacher_steps).x_1
    equal = bool(torch.equal(built.cpu(), sampled.cpu()))
    if not equal:
        raise CheckpointError(f"{ckpt.spec}: a K=1 build differs from the teacher's own sampler")
    return {"equal": equal, "samples": samples, "teacher_steps": teacher_steps}


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """What was detected: family, vocabulary, mask id, source, time input, parameters."""
    cfg = ckpt.config
    adapter = cfg.provenance.get("adapter", {})
    model = ckpt.model
    return {
        "spec": ckpt.spec,
        "directory": str(ckpt.directory),
        "identity": ckpt.identity,
        "family": adapter.get("family", "tsdfm"),
        "model_type": adapter.get("model_type"),
        "source": cfg.source,
        "vocab_size": cfg.vocab_size,
        "model_vocab": adapter.get("model_vocab", cfg.input_vocab),
        "mask_id": adapter.get("mask_id", cfg.mask_token_id),
        "solver_mask_id": cfg.mask_token_id,
        "never_drawn": len(adapter.get("never", [])),
        "seq_len": cfg.seq_len,
        "time_input": adapter.get("time_input", "t" if cfg.backbone.time_conditioning else "none"),
        "time_invariant": bool(model.time_invariant),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trust_remote_code": bool(adapter.get("trust_remote_code", False)),
        "code": adapter.get("code", {}),
        "tokenizer": ckpt.tokenizer is not None,
    }


def check_teacher(
    ckpt: Checkpoint,
    samples: int = 4,
    steps: int | None = None,
    evaluator: Any = None,
) -> dict[str, Any]:
    """The whole ``teacher check`` report of a loaded teacher (module docstring)."""
    return {
        "detected": describe(ckpt),
        "step": step_check(ckpt),
        "preflight": float64_preflight(ckpt, samples, steps, evaluator),
        "k1": k1_check(ckpt),
        "ok": True,
    }
