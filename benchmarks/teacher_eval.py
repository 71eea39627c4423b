"""Measure a teacher at several step counts under the exact likelihood; write JSON + Markdown.

    python benchmarks/teacher_eval.py                      # bundled teacher, 1,000 samples,
                                                           # 1,024 and 8 steps, 3 seeds
    python benchmarks/teacher_eval.py --model runs/teacher/final --seeds 1

Results go to docs/results/teacher.{json,md}. Numbers are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from results_io import result_paths, write_results

from tsdfm.models.checkpoint import bundled_path, load_checkpoint
from tsdfm.models.eval.evaluate import EvalConfig, evaluate_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(bundled_path("teacher")))
    ap.add_argument("--steps", type=int, nargs="+", default=[1024, 8])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--out", default="docs/results/teacher")
    ap.add_argument(
        "--render", action="store_true", help="Only re-render the Markdown from --out.json"
    )
    args = ap.parse_args()
    if args.render:
        json_path, md_path = result_paths(args.out)
        md_path.write_text(_markdown(json.loads(json_path.read_text())))
        return

    ckpt = load_checkpoint(args.model)
    runs = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        runs.append(
            evaluate_checkpoint(
                ckpt, EvalConfig(tuple(args.steps), args.samples, args.batch_size, seed)
            )
        )
        print(f"seed {seed} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    summary = []
    for i, steps in enumerate(args.steps):
        arms = [r["arms"][i] for r in runs]
        summary.append(_summarise(f"teacher, {steps} steps", steps, arms))
    summary.append(_summarise("real data", None, [r["real_data"] for r in runs]))
    truth = runs[0]["true_perplexity"]
    result = {
        "benchmark": "teacher_eval",
        "command": "python " + " ".join(sys.argv),
        "model": runs[0]["model"],
        "evaluator": "exact likelihood of the synthetic language",
        "true_perplexity": truth,
        "samples_per_seed": args.samples,
        "seeds": args.seeds,
        "sampler": runs[0]["sampler"],
        "device": runs[0]["device"],
        "summary": summary,
        "runs": runs,
    }
    print(write_results(args.out, result, _markdown(result)).read_text())


def _mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarise(name, steps, arms):
    ppl = _mean_sd([a["gen_ppl"] for a in arms])
    ent = _mean_sd([a["entropy_mean"] for a in arms])
    row = {
        "name": name,
        "steps": steps,
        "gen_ppl_mean": ppl[0],
        "gen_ppl_sd": ppl[1],
        "entropy_mean": ent[0],
        "entropy_sd": ent[1],
    }
    if arms[0].get("seconds_per_sample") is not None:
        row["seconds_per_sample"] = statistics.fmean(a["seconds_per_sample"] for a in arms)
        row["forwards_per_sample"] = statistics.fmean(a["forwards_per_sample"] for a in arms)
    return row


def _markdown(r: dict) -> str:
    truth = r["true_perplexity"]
    dev = r["device"]
    lines = [
        "# Bundled teacher: generative perplexity by step count",
        "",
        f"Model `{r['model']['identity']}` ({r['model']['parameters']:,} parameters, "
        f"{r['model']['source']} source). Evaluator: {r['evaluator']}, true perplexity "
        f"exp(H/L) = **{truth:.3f}**. {r['samples_per_seed']:,} samples per seed, "
        f"{r['seeds']} seeds (mean ± sd over seeds). Sampler: {r['sampler']}.",
        "",
        "| arm | gen-PPL | × true PPL | unigram entropy (nats) | forwards/sample | s/sample |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["summary"]:
        fw = row.get("forwards_per_sample")
        sp = row.get("seconds_per_sample")
        lines.append(
            f"| {row['name']} | {row['gen_ppl_mean']:.3f} ± {row['gen_ppl_sd']:.3f} | "
            f"{row['gen_ppl_mean'] / truth:.3f} | {row['entropy_mean']:.3f} ± "
            f"{row['entropy_sd']:.3f} | {'-' if fw is None else f'{fw:.1f}'} | "
            f"{'-' if sp is None else f'{sp:.4f}'} |"
        )
    by_steps = {row["steps"]: row["gen_ppl_mean"] for row in r["summary"]}
    if 1024 in by_steps and 8 in by_steps:
        lines += [
            "",
            "| target (issue 2) | measured | target |",
            "|---|---|---|",
            f"| gen-PPL at 1,024 steps / true PPL | {by_steps[1024] / truth:.3f}x | ≤ 1.5x |",
            f"| gen-PPL at 8 steps / gen-PPL at 1,024 steps | {by_steps[8] / by_steps[1024]:.2f}x"
            " | ≥ 1.5x (the gap distillation must close) |",
        ]
    lines += [
        "",
        f"Device: {dev['device']} ({dev['cpu']}, {dev['threads']} threads), torch "
        f"{dev['torch']}, Python {dev['python']}"
        + (f", GPU {dev['gpu']}" if "gpu" in dev else "")
        + ".",
        "",
        f"Command: `{r['command']}`",
        "",
        "Forwards/sample counts the per-sequence forward passes actually run: the mask-source "
        "teacher is time-invariant, so the sampler re-evaluates a sequence only after it changed "
        "(exact, not an approximation).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
