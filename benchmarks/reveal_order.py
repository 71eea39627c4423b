"""Where a few-step sampler reveals matters more than anything a dataset can teach it.

On the synthetic language (exact likelihood), two denoisers are sampled in S steps with the
two reveal orders of ``tsdfm.models.solver.RevealPlan``, each along a temperature frontier
(logits / T):

- the exact posterior of the language (``ExactDenoiser``): the best any denoiser can be;
- the bundled teacher.

``random`` is the mixture path's own rule (each masked position moves with q(t, h)), so a
coarse step draws neighbouring tokens independently; ``dilated`` reveals a fixed, evenly
spread group per step (every S-th position for L = 64), so tokens drawn together are never
neighbours. The gap between the exact posterior's two rows is the factorisation error the
order removes; the gap between the exact posterior and the teacher in one order is the
teacher's own error, which is what shaping can correct.

    python benchmarks/reveal_order.py                     # 1,000 samples per arm, 2 seeds
    python benchmarks/reveal_order.py --samples 200 --seeds 1 --out /tmp/reveal-order

Evaluation seeds start at 1000 (sample i of seed s has counter seed (1000 + s)·2^32 + i), far
from every dataset and compass stream of the project's builds (dataset seeds are small).
Results: docs/results/reveal-order.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import cpu_device, package_versions, write_results

from tsdfm.models.checkpoint import bundled_path, load_checkpoint
from tsdfm.models.data.sources import load_language
from tsdfm.models.data.synthetic import ExactDenoiser
from tsdfm.models.eval.evaluate import FrontierPoint, describe_samples, gen_ppl_at_entropy
from tsdfm.models.eval.metrics import ExactEvaluator
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.solver import sample

EVAL_SEED_BASE = 1000
TEMPERATURES = (1.0, 0.9, 0.8, 0.7, 0.6)


def run(samples: int, seeds: int, steps: int, batch: int) -> dict:
    teacher = load_checkpoint(bundled_path("teacher"), role="teacher")
    mc = teacher.config
    language = load_language(teacher.directory, mc.data)
    evaluator = ExactEvaluator(language)
    path = mc.path()
    denoisers = {
        "exact posterior": ExactDenoiser(language, mc.mask_token_id),
        "teacher": teacher.model,
    }
    rows = []
    for (name, model), order, T in (
        (m, o, T) for m in denoisers.items() for o in ("random", "dilated") for T in TEMPERATURES
    ):
        per_seed = []
        for s in range(seeds):
            xs, t0 = [], time.perf_counter()
            for lo in range(0, samples, batch):
                ids = torch.arange(lo, min(samples, lo + batch), dtype=torch.long)
                seed_ids = trajectory_seed(EVAL_SEED_BASE + s, ids)
                res = sample(model, path, seed_ids, mc.seq_len, steps, None, T, order)
                xs.append(res.x_1)
            arm = describe_samples(
                f"{name}, {steps} steps, {order}, T={T:g}",
                torch.cat(xs),
                evaluator,
                mc.input_vocab,
                steps=steps,
                seconds=time.perf_counter() - t0,
                temperature=T,
            )
            per_seed.append(asdict(arm))
        ppl = torch.tensor([a["gen_ppl"] for a in per_seed])
        ent = torch.tensor([a["entropy_mean"] for a in per_seed])
        rows.append(
            {
                "model": name,
                "order": order,
                "temperature": T,
                "steps": steps,
                "gen_ppl": float(ppl.mean()),
                "gen_ppl_sd": float(ppl.std()) if seeds > 1 else 0.0,
                "entropy": float(ent.mean()),
                "entropy_sd": float(ent.std()) if seeds > 1 else 0.0,
                "per_seed": [
                    {"gen_ppl": a["gen_ppl"], "entropy": a["entropy_mean"]} for a in per_seed
                ],
            }
        )
        print(f"{rows[-1]['model']:>16} {order:>8} T={T:<4g} gen-PPL {rows[-1]['gen_ppl']:7.3f} "
              f"entropy {rows[-1]['entropy']:.3f}", flush=True)  # fmt: skip
    real = language.sample(samples, torch.Generator().manual_seed(EVAL_SEED_BASE))
    real_arm = describe_samples("real data", real, evaluator, mc.input_vocab)
    return {
        "benchmark": "reveal_order",
        "steps": steps,
        "samples_per_seed": samples,
        "seeds": seeds,
        "eval_seed_base": EVAL_SEED_BASE,
        "temperatures": list(TEMPERATURES),
        "teacher_identity": teacher.identity,
        "true_perplexity": language.perplexity(),
        "real_data": {"gen_ppl": real_arm.gen_ppl, "entropy": real_arm.entropy_mean},
        "rows": rows,
        "matched": matched(rows),
        "device": cpu_device(),
        "versions": package_versions(("torch",)),
    }


def matched(rows: list[dict]) -> list[dict]:
    """Each dilated T = 1 row against the random-order frontier of the same model, at its
    own entropy (None when outside the frontier)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        front = [
            (r["temperature"], r["gen_ppl"], r["entropy"])
            for r in rows
            if r["model"] == model and r["order"] == "random"
        ]
        points = [FrontierPoint(t, p, h) for t, p, h in front]
        for r in rows:
            if r["model"] == model and r["order"] == "dilated" and r["temperature"] == 1.0:
                at = gen_ppl_at_entropy(points, r["entropy"])
                out.append(
                    {
                        "model": model,
                        "dilated_gen_ppl": r["gen_ppl"],
                        "entropy": r["entropy"],
                        "random_frontier_at_entropy": at,
                        "ratio": None if at is None else r["gen_ppl"] / at,
                    }
                )
    return out


def markdown(r: dict, command: str) -> str:
    lines = [
        "# Reveal order: random vs dilated, at matched entropy",
        "",
        f"Evaluator: exact likelihood of the synthetic language (true perplexity "
        f"{r['true_perplexity']:.3f}; real data {r['real_data']['gen_ppl']:.3f} at unigram "
        f"entropy {r['real_data']['entropy']:.3f}). {r['samples_per_seed']} samples per arm "
        f"and seed, {r['seeds']} evaluation seeds from {r['eval_seed_base']} (mean ± sd over "
        f"seeds), {r['steps']} steps, float64 draws from softmax(logits / T).",
        "",
        "| denoiser | order | T | gen-PPL | unigram entropy |",
        "|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['model']} | {x['order']} | {x['temperature']:g} | {x['gen_ppl']:.3f} ± "
            f"{x['gen_ppl_sd']:.3f} | {x['entropy']:.3f} ± {x['entropy_sd']:.3f} |"
        )
    lines += [
        "",
        "## Dilated at T = 1 against the random-order temperature frontier, at its entropy",
        "",
        "| denoiser | dilated gen-PPL | entropy | random-order frontier there | ratio |",
        "|---|---|---|---|---|",
    ]
    for m in r["matched"]:
        at = "outside frontier" if m["random_frontier_at_entropy"] is None else (
            f"{m['random_frontier_at_entropy']:.3f}")  # fmt: skip
        ratio = "–" if m["ratio"] is None else f"{m['ratio']:.3f}"
        lines.append(
            f"| {m['model']} | {m['dilated_gen_ppl']:.3f} | {m['entropy']:.3f} | {at} | {ratio} |"
        )
    d = r["device"]
    lines += [
        "",
        "The exact posterior's two orders differ only by where the steps reveal: that gap is the "
        "factorisation error of a per-position step, which the dilated order removes almost "
        "entirely. The teacher's remaining gap to the exact posterior in the dilated order is "
        "the teacher's own error: the part that data shaping can correct.",
        "",
        f"Device: {d['device']} ({d['cpu']}, {d['threads']} threads), torch "
        f"{r['versions']['torch']}, Python {d['python']}.",
        "",
        f"Command: `{command}`",
        "",
        "![gen-PPL against entropy per denoiser and order](reveal-order.png)",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for model, marker in (("exact posterior", "o"), ("teacher", "s")):
        for order, style in (("random", "--"), ("dilated", "-")):
            pts = [x for x in r["rows"] if x["model"] == model and x["order"] == order]
            pts.sort(key=lambda x: x["entropy"])
            ax.plot([x["entropy"] for x in pts], [x["gen_ppl"] for x in pts], style,
                    marker=marker, label=f"{model}, {order}")  # fmt: skip
            for x in pts:
                ax.annotate(f"{x['temperature']:g}", (x["entropy"], x["gen_ppl"]), fontsize=6)
    ax.axvline(r["real_data"]["entropy"], color="grey", lw=0.8, label="real data entropy")
    ax.axhline(r["true_perplexity"], color="grey", lw=0.8, ls=":", label="true perplexity")
    ax.set_yscale("log")
    ax.set_xlabel("unigram entropy (nats)")
    ax.set_ylabel(f"gen-PPL at {r['steps']} steps (exact)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--out", default="docs/results/reveal-order")
    args = ap.parse_args()
    t0 = time.perf_counter()
    r = run(args.samples, args.seeds, args.steps, args.batch)
    r["wall_seconds"] = time.perf_counter() - t0
    command = "python benchmarks/reveal_order.py " + " ".join(sys.argv[1:])
    r["command"] = command.strip()
    md = write_results(args.out, r, markdown(r, command.strip()))
    plot(r, Path(args.out + ".png"))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
