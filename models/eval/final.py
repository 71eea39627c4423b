"""The evaluation a training run ends with: the final checkpoint's gen-PPL at its own step
count under the synthetic language's exact likelihood, written beside the run.

``teacher train`` and ``distill`` both call it; a checkpoint of a text corpus has no exact
likelihood, so nothing is evaluated for it (use ``tsdfm-pipeline eval --evaluator ...``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tsdfm.models.checkpoint import CONFIG_FILE, load_checkpoint
from tsdfm.models.eval.evaluate import EvalConfig, evaluate_checkpoint


def final_eval(
    final_dir: str | Path, steps: int, samples: int, json_path: str | Path
) -> dict | None:
    """Evaluate ``final_dir`` with ``samples`` samples of ``steps`` steps (seed 0) and write the
    report to ``json_path``; None (nothing written) for a checkpoint of a text corpus."""
    config = json.loads((Path(final_dir) / CONFIG_FILE).read_text())
    if (config.get("data") or {}).get("kind") != "synthetic":  # read before building a network
        return None
    ckpt = load_checkpoint(final_dir)
    report = evaluate_checkpoint(ckpt, EvalConfig((steps,), samples, min(samples, 256), 0))
    Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_final_eval(report: dict, json_path: str | Path) -> str:
    """One line: gen-PPL and entropy of the final checkpoint against the true values."""
    arm = report["arms"][0]
    return (
        f"final eval ({report['config']['samples']} samples, {arm['steps']} steps): gen-PPL "
        f"{arm['gen_ppl']:.3f} (true {report['true_perplexity']:.3f}), entropy "
        f"{arm['entropy_mean']:.3f} (real {report['real_data']['entropy_mean']:.3f}) -> {json_path}"
    )
