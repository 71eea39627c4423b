"""The TS-DFM claim at small scale: do shaped trajectories make better few-step students?

    python benchmarks/shaping.py                       # synthetic track, default preset
    python benchmarks/shaping.py --preset ci           # minutes: the smallest end-to-end run
    python benchmarks/shaping.py --preset quick        # main arms and controls only, no sweeps
    python benchmarks/shaping.py --preset gpu --device cuda

Every arm is made with the project's own machinery (``run_build`` on Ray, ``train_student``,
the jump-rule samplers) and scored by the exact likelihood of the synthetic language, an
evaluator that shaped and trained nothing. Arms:

- teacher at ``teacher_eval_steps`` (8, 32, 128, 1,024 by default);
- students distilled from a blind (K = 1) and a shaped (K = 8) dataset, same budget, sampled at
  ``student_eval_steps`` (1, 2, 4, 8, 16);
- data-volume control: a student from a blind dataset with ``control_factor`` × the
  trajectories (same training budget);
- inference-time search control: the teacher at S steps with best-of-K by the compass at every
  step (the navigator with N = S);
- sweeps for the S-step student: K in ``k_sweep`` (τ = 0) and τ in ``tau_sweep`` (K = 8).

Seeds: each student is trained with ``seeds`` data-order seeds and each sampler is evaluated
with as many sampling seeds (seed s trains student s and samples it with seed s); the datasets
themselves are built once per arm (seed 0): their construction is deterministic, and rebuilding
them per seed would triple the cost of the preset.

Resumable: datasets resume shard by shard, students from their checkpoints, and each finished
evaluation is cached under the work folder; rerun the same command after an interruption.
Results: docs/results/shaping-<track>.{json,md} and PNG plots beside them (the ci preset
writes under the work folder instead, so it never overwrites measured results).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from results_io import write_results

from models.checkpoint import bundled_path, load_checkpoint
from models.eval.evaluate import EvalConfig, evaluate_checkpoint
from models.eval.metrics import ExactEvaluator, generative_perplexity, unigram_entropy
from models.train.teacher import load_language

SCHEMA = "tsdfm-shaping/1"


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run (see the module docstring for the arms)."""

    trajectories: int
    shards: int
    control_factor: int
    candidates: int
    k_sweep: tuple[int, ...]
    tau_sweep: tuple[float, ...]
    student_steps: int
    teacher_steps: int
    distill_steps: int
    distill_batch: int
    distill_lr: float
    eval_samples: int
    seeds: int
    teacher_eval_steps: tuple[int, ...]
    student_eval_steps: tuple[int, ...]
    heldout_fraction: float = 0.02


PRESETS = {
    "ci": Preset(
        trajectories=16,
        shards=2,
        control_factor=2,
        candidates=4,
        k_sweep=(1, 2, 4),
        tau_sweep=(0.0, 0.5),
        student_steps=4,
        teacher_steps=32,
        distill_steps=4,
        distill_batch=16,
        distill_lr=3e-4,
        eval_samples=32,
        seeds=2,
        teacher_eval_steps=(4, 32),
        student_eval_steps=(1, 4),
        heldout_fraction=0.1,
    ),
    "quick": Preset(
        trajectories=256,
        shards=4,
        control_factor=8,
        candidates=8,
        k_sweep=(1, 8),
        tau_sweep=(0.0,),
        student_steps=8,
        teacher_steps=1024,
        distill_steps=200,
        distill_batch=64,
        distill_lr=3e-4,
        eval_samples=1000,
        seeds=3,
        teacher_eval_steps=(8, 32, 1024),
        student_eval_steps=(1, 2, 4, 8, 16),
    ),
    "default": Preset(
        trajectories=512,
        shards=4,
        control_factor=8,
        candidates=8,
        k_sweep=(1, 2, 4, 8),
        tau_sweep=(0.0, 0.25, 0.5),
        student_steps=8,
        teacher_steps=1024,
        distill_steps=400,
        distill_batch=64,
        distill_lr=3e-4,
        eval_samples=1000,
        seeds=3,
        teacher_eval_steps=(8, 32, 128, 1024),
        student_eval_steps=(1, 2, 4, 8, 16),
    ),
    "gpu": Preset(
        trajectories=8192,
        shards=32,
        control_factor=8,
        candidates=8,
        k_sweep=(1, 2, 4, 8),
        tau_sweep=(0.0, 0.25, 0.5),
        student_steps=8,
        teacher_steps=1024,
        distill_steps=4000,
        distill_batch=256,
        distill_lr=3e-4,
        eval_samples=4000,
        seeds=3,
        teacher_eval_steps=(8, 32, 128, 1024),
        student_eval_steps=(1, 2, 4, 8, 16),
    ),
}


@dataclass(frozen=True)
class DataArm:
    """One trajectory dataset: K candidates, shaping from τ, a multiple of the base size."""

    name: str
    candidates: int
    tau: float = 0.0
    factor: int = 1


def data_arms(p: Preset) -> list[DataArm]:
    """The datasets a preset needs, main arms first."""
    arms = [
        DataArm("blind", 1),
        DataArm(f"shaped K={p.candidates}", p.candidates),
        DataArm(f"blind x{p.control_factor} data", 1, factor=p.control_factor),
    ]
    arms += [DataArm(f"shaped K={k}", k) for k in p.k_sweep if k not in (1, p.candidates)]
    arms += [DataArm(f"shaped K={p.candidates} tau={t:g}", p.candidates, t) for t in p.tau_sweep]
    seen, unique = set(), []
    for a in arms:  # tau=0 repeats the main shaped arm
        key = (a.candidates, a.tau if a.candidates > 1 else 0.0, a.factor)
        if key not in seen:
            seen.add(key)
            unique.append(a)
    return unique


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=." else "-" for c in name).strip("-")


class Run:
    """The work folder of one (track, preset): datasets, students, cached evaluations."""

    def __init__(self, work: Path, preset: Preset, teacher: str, compass: str, device: str):
        self.work, self.p, self.teacher, self.compass = work, preset, teacher, compass
        self.device = device
        (work / "evals").mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # -- datasets ---------------------------------------------------------------------------
    def dataset(self, arm: DataArm) -> dict:
        from pipeline.build import run_build
        from pipeline.card import statistics
        from pipeline.config import BuildConfig
        from pipeline.manifest import Manifest
        from pipeline.navigator import NavigatorConfig

        p = self.p
        root = self.work / "data" / _slug(arm.name)
        shards = p.shards * arm.factor
        per = p.trajectories // p.shards
        nav = NavigatorConfig(p.student_steps, p.teacher_steps, arm.candidates, arm.tau)
        cfg = BuildConfig(
            teacher=self.teacher,
            compass=self.compass if arm.candidates > 1 else None,
            shards=shards,
            trajectories_per_shard=per,
            batch_size=per,
            navigator=nav,
            seed=0,
            precision="bf16" if self.device.startswith("cuda") else "fp32",
        )
        t0 = time.perf_counter()
        summary = run_build(cfg, str(root), device="cuda" if self.device != "cpu" else "cpu")
        stats = statistics(Manifest.load(str(root)).to_dict())
        c = summary.totals["counters"]
        self.log(
            f"dataset {arm.name}: {summary.totals['rows']} trajectories "
            f"({len(summary.built)} shards built, {time.perf_counter() - t0:.0f}s)"
        )
        return {
            "name": arm.name,
            "root": str(root),
            "K": arm.candidates,
            "tau": arm.tau,
            "trajectories": summary.totals["rows"],
            "bytes": summary.totals["bytes"],
            "fingerprint": summary.fingerprint,
            "energy_gain": stats["energy_gain"],
            "mean_final_unigram_entropy": stats["mean_final_unigram_entropy"],
            "actor_seconds": c.get("build_seconds"),
        }

    # -- students ---------------------------------------------------------------------------
    def student(self, arm: DataArm, seed: int) -> Path:
        from models.train.distill import DistillConfig, train_student

        p = self.p
        out = self.work / "students" / f"{_slug(arm.name)}-s{seed}"
        t0 = time.perf_counter()
        result = train_student(
            DistillConfig(
                data=str(self.work / "data" / _slug(arm.name)),
                init=self.teacher,
                out=str(out),
                steps=p.distill_steps,
                batch_size=p.distill_batch,
                lr=p.distill_lr,
                warmup=min(100, p.distill_steps // 10),
                heldout_fraction=p.heldout_fraction,
                checkpoint_every=max(1, p.distill_steps // 4),
                eval_every=max(1, p.distill_steps // 4),
                num_workers=0,
                seed=seed,
                device=self.device,
            ),
            warn=lambda m: self.log(f"warning: {m}"),
        )
        self.log(
            f"student {arm.name} seed {seed}: loss {result.final_loss:.4f} "
            f"({time.perf_counter() - t0:.0f}s)"
        )
        return result.final_dir

    # -- evaluations (cached) ---------------------------------------------------------------
    def _cached(self, key: str, compute) -> dict:
        path = self.work / "evals" / f"{_slug(key)}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        tmp.rename(path)
        return value

    def sample_eval(self, key: str, spec: str, steps: tuple[int, ...], seed: int) -> list[dict]:
        def compute():
            ckpt = load_checkpoint(spec, self.device)
            report = evaluate_checkpoint(
                ckpt, EvalConfig(steps, self.p.eval_samples, 250, seed), self.device
            )
            return {"arms": [_figures(a) for a in report["arms"]], "real": report["real_data"]}

        return self._cached(key, compute)["arms"]

    def search_eval(self, seed: int) -> dict:
        """The teacher at S steps, best-of-K by the compass at every step (N = S)."""

        def compute():
            from models.compass import CompassScorer
            from pipeline.navigator import NavigatorConfig, navigate

            p = self.p
            teacher = load_checkpoint(self.teacher, self.device, role="teacher")
            compass = load_checkpoint(self.compass, self.device, role="compass")
            scorer = CompassScorer.from_checkpoint(compass)
            mc = teacher.config
            nav = NavigatorConfig(p.student_steps, p.student_steps, p.candidates)
            xs, seconds, forwards = [], 0.0, 0
            for lo in range(0, p.eval_samples, 250):
                n = min(250, p.eval_samples - lo)
                seeds = torch.arange(lo, lo + n, dtype=torch.long) + seed * 2**32
                t0 = time.perf_counter()
                res = navigate(
                    teacher.model, scorer, mc.path(), seeds.to(self.device), mc.seq_len, nav
                )
                seconds += time.perf_counter() - t0
                forwards += res.counters.row_forwards
                xs.append(res.states[:, -1].cpu())
            x = torch.cat(xs)
            language = load_language(teacher.directory, mc.data)
            nll, n_tok = ExactEvaluator(language).nll(x)
            return {
                "steps": p.student_steps,
                "samples": int(x.shape[0]),
                "gen_ppl": generative_perplexity(nll, n_tok),
                "entropy_mean": float(unigram_entropy(x, mc.vocab_size).mean()),
                "nfe": p.student_steps * p.candidates,
                "forwards_per_sample": forwards / x.shape[0],
                "seconds_per_sample": seconds / x.shape[0],
            }

        return self._cached(f"search-s{seed}", compute)


def _figures(arm: dict) -> dict:
    keep = ("steps", "samples", "gen_ppl", "entropy_mean", "nfe", "forwards_per_sample")
    out = {k: arm.get(k) for k in keep}
    out["seconds_per_sample"] = arm.get("seconds_per_sample")
    for k, v in arm.items():
        if k.startswith("distinct"):
            out[k] = v
    return out


def _mean_sd(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "per_seed": values}


def _aggregate(name: str, kind: str, per_seed: list[dict], extra: dict | None = None) -> dict:
    row = {"arm": name, "kind": kind, "steps": per_seed[0]["steps"]}
    for key in ("gen_ppl", "entropy_mean", "seconds_per_sample", "nfe"):
        vals = [s[key] for s in per_seed if s.get(key) is not None]
        if vals:
            row[key] = _mean_sd(vals)
    row.update(extra or {})
    return row


def run(track: str, preset_name: str, work: Path, out: str | None, device: str, args) -> dict:
    if track != "synthetic":
        raise SystemExit(
            "error: only the synthetic track is implemented in this version; the text track "
            "(a corpus teacher evaluated by an in-project LM and SmolLM2) is not built yet"
        )
    p = PRESETS[preset_name]
    if args.distill_steps:
        p = replace(p, distill_steps=args.distill_steps)
    teacher = args.teacher or str(bundled_path("teacher"))
    compass = args.compass or str(bundled_path("compass"))
    r = Run(work, p, teacher, compass, device)
    start = time.perf_counter()
    arms = data_arms(p)
    datasets = [r.dataset(a) for a in arms]
    rows: list[dict] = []
    real = None
    for s in range(p.seeds):
        r.sample_eval(f"teacher-s{s}", teacher, p.teacher_eval_steps, s)
    for i, steps in enumerate(p.teacher_eval_steps):
        per = [
            r.sample_eval(f"teacher-s{s}", teacher, p.teacher_eval_steps, s)[i]
            for s in range(p.seeds)
        ]
        rows.append(_aggregate(f"teacher, {steps} steps", "teacher", per))
    real_path = r.work / "evals" / "teacher-s0.json"
    real = json.loads(real_path.read_text())["real"]
    search = [r.search_eval(s) for s in range(p.seeds)]
    rows.append(
        _aggregate(
            f"teacher, {p.student_steps} steps, best-of-{p.candidates} by compass per step",
            "search control",
            search,
        )
    )
    for a in arms:
        main = a.name in ("blind", f"shaped K={p.candidates}")
        steps = p.student_eval_steps if main else (p.student_steps,)
        evals = []
        for s in range(p.seeds):
            final = r.student(a, s)
            evals.append(r.sample_eval(f"student-{_slug(a.name)}-s{s}", str(final), steps, s))
        for i, st in enumerate(steps):
            rows.append(
                _aggregate(
                    f"student from {a.name}, {st} steps",
                    "student",
                    [e[i] for e in evals],
                    {"dataset": a.name, "K": a.candidates, "tau": a.tau, "factor": a.factor},
                )
            )
    result = {
        "schema": SCHEMA,
        "benchmark": "shaping",
        "track": track,
        "preset": preset_name,
        "config": asdict(p),
        "evaluator": "exact likelihood of the synthetic language",
        "teacher": load_checkpoint(teacher).identity,
        "compass": load_checkpoint(compass).identity,
        "datasets": datasets,
        "rows": rows,
        "real_data": {"gen_ppl": real["gen_ppl"], "entropy_mean": real["entropy_mean"]},
        "targets": targets(rows, p, real),
        "device": {
            "device": device,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **({"gpu": torch.cuda.get_device_name(0)} if device.startswith("cuda") else {}),
        },
        "command": "python " + " ".join(sys.argv),
        "seconds": time.perf_counter() - start,
    }
    dest = out or str(work / f"shaping-{track}")
    result["plots"] = [f"{Path(dest).name}-steps.png", f"{Path(dest).name}-entropy.png"]
    md = write_results(dest, result, markdown(result))
    plot(result, dest)
    print(md.read_text())
    return result


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["arm"] == name), None)


def targets(rows: list[dict], p: Preset, real: dict) -> list[dict]:
    """Where each target of issue 7 lands (measured means; never asserted)."""
    S, K = p.student_steps, p.candidates
    shaped = _row(rows, f"student from shaped K={K}, {S} steps")
    blind = _row(rows, f"student from blind, {S} steps")
    control = _row(rows, f"student from blind x{p.control_factor} data, {S} steps")
    teacher = _row(rows, f"teacher, {max(p.teacher_eval_steps)} steps")
    out = []

    def add(name, value, target, ok):
        out.append({"target": name, "measured": value, "goal": target, "met": bool(ok)})

    if shaped and teacher:
        ratio = shaped["gen_ppl"]["mean"] / teacher["gen_ppl"]["mean"]
        ent = shaped["entropy_mean"]["mean"] / real["entropy_mean"]
        add(
            f"shaped student at {S} steps vs teacher at {max(p.teacher_eval_steps)} steps "
            "(gen-PPL ratio)",
            ratio,
            "≤ 0.68",
            ratio <= 0.68,
        )
        add("… with unigram entropy vs real data", ent, "≥ 0.95", ent >= 0.95)
    if shaped and blind:
        ratio = shaped["gen_ppl"]["mean"] / blind["gen_ppl"]["mean"]
        add(f"shaped vs blind student at {S} steps (gen-PPL ratio)", ratio, "≤ 0.8", ratio <= 0.8)
    if shaped and control:
        ratio = shaped["gen_ppl"]["mean"] / control["gen_ppl"]["mean"]
        add(
            f"shaped student vs the x{p.control_factor}-data blind student (gen-PPL ratio)",
            ratio,
            "< 1",
            ratio < 1,
        )
    return out


def _fmt(cell: dict | None, digits: int = 3) -> str:
    if not cell:
        return ""
    return f"{cell['mean']:.{digits}f} ± {cell['sd']:.{digits}f}"


def markdown(r: dict) -> str:
    p = r["config"]
    lines = [
        f"# Shaping benchmark, {r['track']} track ({r['preset']} preset)",
        "",
        f"Evaluator: {r['evaluator']} (true perplexity of real data: "
        f"{r['real_data']['gen_ppl']:.3f} measured on {p['eval_samples']} real sequences, "
        f"unigram entropy {r['real_data']['entropy_mean']:.3f} nats). {p['eval_samples']} "
        f"samples per arm and seed, {p['seeds']} seeds (mean ± sd over seeds). Students: "
        f"{p['distill_steps']} steps × batch {p['distill_batch']} from the teacher's weights. "
        f"Datasets: {p['trajectories']} trajectories, S = {p['student_steps']}, "
        f"N = {p['teacher_steps']}.",
        "",
        "| arm | gen. perplexity | unigram entropy | NFE | s/sample |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['arm']} | {_fmt(row.get('gen_ppl'))} | {_fmt(row.get('entropy_mean'))} | "
            f"{row.get('nfe', {}).get('mean', ''):g} | "
            f"{row.get('seconds_per_sample', {}).get('mean', float('nan')):.4f} |"
        )
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in r["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']:.3f} | {t['goal']} | {'yes' if t['met'] else 'no'} |"
        )
    lines += ["", "## Datasets", "", "| dataset | K | τ | trajectories | energy gain | bytes |"]
    lines.append("|---|---|---|---|---|---|")
    for d in r["datasets"]:
        gain = "" if d["energy_gain"] is None else f"{d['energy_gain']:.3f}"
        lines.append(
            f"| {d['name']} | {d['K']} | {d['tau']:g} | {d['trajectories']} | {gain} | "
            f"{d['bytes']:,} |"
        )
    dev = r["device"]
    lines += [
        "",
        f"Device: {dev['device']} ({dev['cpu']}, {dev['threads']} threads), torch "
        f"{dev['torch']}, Python {dev['python']}"
        + (f", GPU {dev['gpu']}" if "gpu" in dev else "")
        + f". Wall time {r['seconds'] / 60:.1f} min.",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Plots: `{r['plots'][0]}` (perplexity vs steps), `{r['plots'][1]}` (perplexity vs "
        "entropy).",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, dest: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for row in r["rows"]:
        key = row["arm"].rsplit(",", 1)[0] if row["kind"] != "search control" else row["arm"]
        groups.setdefault(key, []).append(row)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda x: x["steps"])
        xs = [x["steps"] for x in rs]
        ys = [x["gen_ppl"]["mean"] for x in rs]
        es = [x["gen_ppl"]["sd"] for x in rs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.axhline(r["real_data"]["gen_ppl"], color="grey", ls="--", lw=1, label="real data")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("generative perplexity (exact)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{dest}-steps.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in groups.items():
        ax.scatter(
            [x["entropy_mean"]["mean"] for x in rs],
            [x["gen_ppl"]["mean"] for x in rs],
            label=name,
            s=18,
        )
    ax.scatter(
        [r["real_data"]["entropy_mean"]],
        [r["real_data"]["gen_ppl"]],
        marker="*",
        s=80,
        color="black",
        label="real data",
    )
    ax.set_yscale("log")
    ax.set_xlabel("unigram entropy per sample (nats)")
    ax.set_ylabel("generative perplexity (exact)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{dest}-entropy.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--track", default="synthetic", choices=["synthetic", "text"])
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--work", default=None, help="work folder (default runs/shaping/TRACK-PRESET)")
    ap.add_argument(
        "--out", default=None, help="results prefix (default docs/results/shaping-TRACK)"
    )
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--compass", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--distill-steps", type=int, default=None)
    args = ap.parse_args()
    work = Path(args.work or f"runs/shaping/{args.track}-{args.preset}")
    out = args.out
    if out is None and args.preset != "ci":
        suffix = "" if args.preset == "default" else f"-{args.preset}"
        out = f"docs/results/shaping-{args.track}{suffix}"
    run(args.track, args.preset, work, out, args.device, args)


if __name__ == "__main__":
    main()
