"""± over seeds for the shaping lab: several ``shaping_lab.py`` results of one teacher in one table.

Each input is one lab run (its OUT.json) with its own dataset seed (and, for the token-ratio arm,
its own compass seed). Frontiers that do not depend on the dataset (the teacher's, same teacher
and the same evaluation seeds) are taken from any run that has them, so a run made with
``--top-steps 0`` is still read against the teacher@1,024 frontier. Per arm and seed: the student
at T = 1, its gen-PPL over each frontier's at its own entropy, and its gen-PPL over
teacher@1,024's at T = 1; then mean ± standard deviation over the seeds (n − 1). A text-track
run (``--track text``) is read under each of its evaluators (``lm``, ``smollm2``): a frontier's
points that an evaluator did not score are left out of its reading under that evaluator.

    python benchmarks/lab_summary.py A.json B.json C.json --out docs/results/NAME
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import write_results

from tsdfm.models.eval.evaluate import FrontierPoint, gen_ppl_at_entropy

TOP = "teacher 1024 steps, random"


def _ppl(p: dict, evaluator: str | None) -> float | None:
    """A point's gen-PPL under ``evaluator`` (None: the run's primary one)."""
    return p["gen_ppl"] if evaluator is None else p.get("gen_ppl_by", {}).get(evaluator)


def _points(pts, evaluator: str | None = None) -> list[FrontierPoint]:
    return [FrontierPoint(p["temperature"], _ppl(p, evaluator), p["entropy"])
            for p in pts if _ppl(p, evaluator) is not None]  # fmt: skip


def _at_one(pts) -> dict:
    return next(p for p in pts if p["temperature"] == 1.0)


def _readings(runs: list[dict]) -> list[tuple[str | None, str]]:
    """(evaluator, label suffix) pairs: the primary reading first, then each other evaluator."""
    evaluators = runs[0].get("evaluators") or []
    return [(None, "")] + [(e, f" [{e}]") for e in evaluators[1:]]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def summarize(runs: list[dict], names: list[str]) -> dict:
    teachers = {r["teacher"]["identity"] for r in runs}
    if len(teachers) != 1:
        raise SystemExit(f"error: the runs have {len(teachers)} teachers; give runs of one")
    top = next((r["frontiers"][TOP] for r in runs if TOP in r["frontiers"]), None)
    real = runs[0]["real_data"]
    readings = _readings(runs)
    rows = []
    for name, r in zip(names, runs, strict=True):
        seed = r["config"]["dataset_seed"]
        fronts = {k: v for k, v in r["frontiers"].items() if k != TOP}
        if top is not None:
            fronts[TOP] = top
        for arm in r["arms"]:
            own = _at_one(arm["student"])
            matched, student = {}, {}
            for ev, suffix in readings:
                student[f"student gen-PPL{suffix}"] = _ppl(own, ev)
                for k, v in fronts.items():
                    at = gen_ppl_at_entropy(_points(v, ev), own["entropy"])
                    matched[k + suffix] = _ratio(_ppl(own, ev), at)
            rows.append({
                "run": name, "dataset_seed": seed, "arm": arm["arm"],
                "token_compass": (r.get("token_compass") or {}).get("spec"),
                "dataset_finals": arm["dataset_finals"], "student": own,
                "student_by": student, "matched": matched,
                "vs_top_at_one": None if top is None
                else own["gen_ppl"] / _at_one(top)["gen_ppl"],
                "entropy_ratio_to_real": own["entropy"] / real["entropy"],
            })  # fmt: skip
    arms = sorted({row["arm"] for row in rows}, key=[row["arm"] for row in rows].index)
    summary = {}
    for arm in arms:
        mine = [row for row in rows if row["arm"] == arm]
        keys = {k: [row["student_by"][k] for row in mine] for k in mine[0]["student_by"]}
        keys |= {"student entropy": [row["student"]["entropy"] for row in mine],
                "dataset finals gen-PPL": [row["dataset_finals"][0] for row in mine]}  # fmt: skip
        for k in mine[0]["matched"]:
            vals = [row["matched"].get(k) for row in mine]
            keys[f"vs {k}"] = vals
        keys["÷ teacher@1024 T=1"] = [row["vs_top_at_one"] for row in mine]
        keys["entropy ÷ real"] = [row["entropy_ratio_to_real"] for row in mine]
        summary[arm] = {k: _stat(v) for k, v in keys.items()}
    return {"benchmark": "shaping_lab_summary", "teacher": runs[0]["teacher"],
            "evaluators": runs[0].get("evaluators") or ["exact"],
            "runs": names, "rows": rows, "summary": summary}  # fmt: skip


def _stat(vals) -> dict:
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"n": 0}
    sd = statistics.stdev(vals) if len(vals) > 1 else None
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": sd}


def _fmt(s: dict) -> str:
    if not s["n"]:
        return "—"
    if s["std"] is None:
        return f"{s['mean']:.3f} (n = 1)"
    return f"{s['mean']:.3f} ± {s['std']:.3f} (n = {s['n']})"


def markdown(r: dict, command: str) -> str:
    lines = ["# Shaping lab over seeds", "",
             f"Teacher `{r['teacher']['identity'][:23]}…`. Runs: "
             + ", ".join(f"`{n}`" for n in r["runs"]) + ". Each run: one dataset seed (and "
             "one compass seed for the token-ratio arm); ± is the standard deviation over runs.",
             "", "| arm | dataset seed | dataset finals | student T=1 | "
             + " | ".join(f"vs {k}" for k in r["rows"][0]["matched"])
             + " | ÷ teacher@1024 T=1 | entropy ÷ real |",
             "|---|---|---|---|" + "---|" * (len(r["rows"][0]["matched"]) + 2)]  # fmt: skip
    for row in r["rows"]:
        fin, own = row["dataset_finals"], row["student"]
        vs = " | ".join("outside" if v is None else f"{v:.3f}" for v in row["matched"].values())
        top = "—" if row["vs_top_at_one"] is None else f"{row['vs_top_at_one']:.3f}"
        lines.append(f"| {row['arm']} | {row['dataset_seed']} | {fin[0]:.3f} @ {fin[1]:.3f} | "
                     f"{own['gen_ppl']:.3f} @ {own['entropy']:.3f} | {vs} | {top} | "
                     f"{row['entropy_ratio_to_real']:.3f} |")  # fmt: skip
    lines += ["", "| arm | quantity | mean ± sd |", "|---|---|---|"]
    for arm, qs in r["summary"].items():
        lines += [f"| {arm} | {q} | {_fmt(s)} |" for q, s in qs.items()]
    lines += ["", "'vs F': the student's gen-PPL at T = 1 over frontier F's, interpolated at the "
              "student's own entropy ('outside' where F does not bracket it). The teacher@1024 "
              "frontier does not depend on the dataset seed and is taken from the run that has "
              "it." + (" 'F [e]': read under evaluator e, on the points e scored; the rest under "
              f"`{r['evaluators'][0]}`." if r["evaluators"][1:] else ""),
              "", f"Command: `{command}`", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="OUT.json files of shaping_lab.py runs")
    ap.add_argument("--out", required=True, help="OUT: writes OUT.json and OUT.md")
    a = ap.parse_args(argv)
    runs = [json.loads(Path(p).read_text()) for p in a.runs]
    result = summarize(runs, [Path(p).stem for p in a.runs])
    command = "python benchmarks/lab_summary.py " + " ".join(sys.argv[1:])
    write_results(a.out, result, markdown(result, command))


if __name__ == "__main__":
    main()
