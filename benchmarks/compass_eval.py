"""Measure an energy compass (or a causal-LM scorer) against its teacher; write JSON + Markdown.

    python benchmarks/compass_eval.py                         # bundled compass and teacher,
                                                              # 512 trajectories x 3 seeds
    python benchmarks/compass_eval.py --compass runs/compass/final --teacher runs/teacher/final
    python benchmarks/compass_eval.py --causal-lm path/to/lm  # the causal-LM scorer instead

Three measurements (see models/eval/compass_metrics.py): ROC AUC of real-noised vs teacher
states at t in {0.25, 0.5, 0.75, 1}; Spearman rho between the energy at t = 1 and the exact NLL
of teacher and real samples; and the selection gain of best-of-K at midpoints of an S = 8 grid
(N = 1,024 teacher steps), paired against the blind trajectory from the same start.
Results go to docs/results/compass.{json,md}. Numbers are measured, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from results_io import write_results

from tsdfm.models.checkpoint import bundled_path, load_checkpoint
from tsdfm.models.compass import CausalLMScorer
from tsdfm.models.eval.compass_metrics import (
    TABLE_HEADERS,
    CompassEvalConfig,
    evaluate_compass,
    evaluate_scorer,
    format_tables,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--compass", default=str(bundled_path("compass")))
    ap.add_argument("--teacher", default=str(bundled_path("teacher")))
    ap.add_argument("--causal-lm", default=None, help="score with this local causal LM instead")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--teacher-steps", type=int, default=1024)
    ap.add_argument("--student-steps", type=int, default=8)
    ap.add_argument("--midpoints", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="docs/results/compass")
    args = ap.parse_args()

    cfg = CompassEvalConfig(
        samples=args.samples,
        seeds=args.seeds,
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        candidates=args.candidates,
        midpoints=tuple(args.midpoints),
        batch_size=args.batch_size,
    )
    teacher = load_checkpoint(args.teacher, args.device, role="teacher")

    def progress(label: str, done: int, total: int) -> None:
        print(f"{label}: {done}/{total}  ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    t0 = time.perf_counter()
    if args.causal_lm:
        scorer = CausalLMScorer.from_pretrained(args.causal_lm, teacher, args.device)
        report = evaluate_scorer(scorer, teacher, cfg, args.device, progress)
        report["scorer"]["spec"] = args.causal_lm
    else:
        compass = load_checkpoint(args.compass, args.device, role="compass")
        report = evaluate_compass(compass, teacher, cfg, args.device, progress)
        report["scorer"]["spec"] = args.compass
        report["scorer"]["parameters"] = sum(p.numel() for p in compass.model.parameters())
        report["scorer"]["provenance"] = compass.config.provenance
    report["benchmark"] = "compass_eval"
    report["command"] = "python " + " ".join(sys.argv)
    report["seconds"] = time.perf_counter() - t0
    print(write_results(args.out, report, _markdown(report)).read_text())


def _table(name: str, rows: list[list[str]]) -> list[str]:
    head = TABLE_HEADERS[name]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _markdown(r: dict) -> str:
    tables = format_tables(r)
    dev = r["device"]
    sel = r["selection"]
    sc = r["scorer"]
    params = f", {sc['parameters']:,} parameters" if "parameters" in sc else ""
    lines = [
        f"# Energy compass: {sc['name']} against its teacher",
        "",
        f"Scorer `{sc['identity']}` ({sc['name']}{params}), teacher `{r['teacher']['identity']}`. "
        f"{r['config']['samples']:,} trajectories per seed, {r['config']['seeds']} seeds "
        "(mean ± sd over seeds). Teacher sampler: ancestral jump rule, float64 inverse-CDF "
        f"draws, N = {sel['teacher_steps']:,} steps.",
        "",
        "## Separation: real sequences noised to t vs the teacher's own states at t",
        "",
        "ROC AUC = P(E(real) < E(teacher)); 0.5 is chance. At t = 1 the teacher states are its "
        "finished samples.",
        "",
        *_table("separation", tables["separation"]),
        "",
        "## Agreement with the exact likelihood",
        "",
        "Spearman ρ between the energy at t = 1 and the exact NLL −log p(x) of the synthetic "
        "language; positive means lower energy goes with likelier sequences.",
        "",
        *_table("spearman", tables["spearman"]),
        "",
        "## Selection gain",
        "",
        f"From the same blind states x(t_k) on the S = {sel['student_steps']} grid, "
        f"{sel['candidates']} candidates are rolled to t_(k+1) (lanes 0..K−1 of the counter "
        "RNG, lane 0 = the blind continuation), the lowest-energy one is kept, and the "
        "trajectory finishes blind. Gain = mean exact NLL of the blind finals minus that of the "
        "selected finals, in nats per sequence (positive = selection helped); the pairing makes "
        "K = 1 the blind trajectory itself.",
        "",
        *_table("selection", tables["selection"]),
        "",
        f"Device: {dev['device']} ({dev['cpu']}, {dev['threads']} threads), torch "
        f"{dev['torch']}, Python {dev['python']}"
        + (f", GPU {dev['gpu']}" if "gpu" in dev else "")
        + f". Wall time {r['seconds']:.0f} s.",
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
