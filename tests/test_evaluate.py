"""Temperature in `sample` and `eval`: arms per (steps, T), the entropy frontier, and reading
gen-PPL off it at matched entropy (tiny checkpoints, few samples)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from tsdfm.models.checkpoint import load_checkpoint
from tsdfm.models.errors import ConfigError
from tsdfm.models.eval.evaluate import (
    EvalConfig,
    FrontierPoint,
    evaluate_checkpoint,
    format_table,
    gen_ppl_at_entropy,
    table_header,
    temperature_for_entropy,
)
from tsdfm.models.eval.sampling import sample_checkpoint
from tsdfm.pipeline.cli import app

runner = CliRunner()


# ---------------------------------------------------------------------------- the frontier
POINTS = [  # deliberately not sorted by entropy
    FrontierPoint(temperature=1.0, gen_ppl=8.0, entropy_mean=2.0),
    FrontierPoint(temperature=0.5, gen_ppl=2.0, entropy_mean=1.0),
    FrontierPoint(temperature=0.8, gen_ppl=4.0, entropy_mean=1.5),
]


def test_gen_ppl_at_entropy_interpolates_log_ppl_linearly_in_entropy():
    # halfway between (1.0, 2) and (1.5, 4): exp(½ log 2 + ½ log 4) = √8
    assert gen_ppl_at_entropy(POINTS, 1.25) == pytest.approx(math.sqrt(8.0), rel=1e-12)
    # a quarter of the way from (1.5, 4) to (2.0, 8): 4 · 2^¼
    assert gen_ppl_at_entropy(POINTS, 1.625) == pytest.approx(4.0 * 2**0.25, rel=1e-12)
    # at a point, and at both ends of the range, its own gen-PPL
    assert gen_ppl_at_entropy(POINTS, 1.5) == 4.0
    assert gen_ppl_at_entropy(POINTS, 1.0) == 2.0 and gen_ppl_at_entropy(POINTS, 2.0) == 8.0


def test_gen_ppl_at_entropy_never_extrapolates():
    assert gen_ppl_at_entropy(POINTS, 0.999) is None
    assert gen_ppl_at_entropy(POINTS, 2.001) is None
    assert gen_ppl_at_entropy([], 1.0) is None
    assert gen_ppl_at_entropy(POINTS, float("nan")) is None
    one = [FrontierPoint(1.0, 5.0, 3.0)]
    assert gen_ppl_at_entropy(one, 3.0) == 5.0 and gen_ppl_at_entropy(one, 3.1) is None
    # two points at one entropy: the geometric mean of theirs
    tie = [FrontierPoint(1.0, 2.0, 1.0), FrontierPoint(0.9, 8.0, 1.0)]
    assert gen_ppl_at_entropy(tie, 1.0) == pytest.approx(4.0, rel=1e-12)


def test_temperature_for_entropy_bisects_and_stops_at_the_tolerance():
    calls = []

    def entropy_at(T):  # H(T) = 2T: the target 1.2 lies at T = 0.6
        calls.append(T)
        return 2 * T

    m = temperature_for_entropy(entropy_at, 1.2, 0.3, 1.0, budget=6, tolerance=0.02, known={1.0: 2})
    # midpoints 0.65 (1.3, high), 0.475 (0.95, low), 0.5625 (1.125, low), 0.60625 (1.2125, ok)
    assert calls == [0.65, 0.475, 0.5625, 0.60625]
    assert m.temperature == 0.60625 and m.entropy == pytest.approx(1.2125)
    assert m.converged and m.evaluations == 4 and dict(m.tried)[1.0] == 2
    calls.clear()
    m = temperature_for_entropy(entropy_at, 1.2, 0.3, 1.0, budget=6, tolerance=0.005)
    assert m.evaluations == 6 == len(calls) and not m.converged
    assert abs(m.temperature - 0.6) <= 0.7 / 2**6  # the closest T tried
    # a target above H(hi): no T in range reaches it; the known end is the answer, for free
    calls.clear()
    m = temperature_for_entropy(entropy_at, 2.5, known={1.0: 2.0})
    assert calls == [] and m.temperature == 1.0 and not m.converged and m.evaluations == 0


# ---------------------------------------------------------------------------- eval arms
def test_two_temperatures_give_two_arms_per_step_count_and_a_frontier(saved_tiny_teacher):
    ckpt = load_checkpoint(saved_tiny_teacher)
    base = evaluate_checkpoint(ckpt, EvalConfig((4,), 12, 8, 0))
    probe = evaluate_checkpoint(ckpt, EvalConfig((4,), 12, 8, 0, temperatures=(0.5,)))
    e_lo, e_hi = sorted([base["arms"][0]["entropy_mean"], probe["arms"][0]["entropy_mean"]])
    assert e_lo < e_hi
    mid, far = (e_lo + e_hi) / 2, e_hi + 1.0
    cfg = EvalConfig((4, 2), 12, 8, 0, temperatures=(1.0, 0.5), match_entropy=(mid, far))
    report = evaluate_checkpoint(ckpt, cfg)
    arms = report["arms"]
    assert [(a["steps"], a["temperature"]) for a in arms] == [
        (4, 1.0),
        (4, 0.5),
        (2, 1.0),
        (2, 0.5),
    ]
    assert [a["name"] for a in arms[:2]] == ["teacher 4 steps", "teacher 4 steps, T=0.5"]
    assert report["real_data"]["temperature"] is None
    assert list(report["config"]["temperatures"]) == [1.0, 0.5]
    # T = 1 is the plain sampler: the same arm as an eval without temperatures
    for a, b in ((arms[0], base["arms"][0]), (arms[1], probe["arms"][0])):
        assert {k: v for k, v in a.items() if k != "seconds_per_sample"} == {
            k: v for k, v in b.items() if k != "seconds_per_sample"
        }
    frontier = report["frontier"]
    assert [f["steps"] for f in frontier] == [4, 2]
    pts = frontier[0]["points"]
    assert [p["entropy_mean"] for p in pts] == [e_lo, e_hi]  # sorted by entropy
    assert {p["temperature"] for p in pts} == {1.0, 0.5}
    (at_mid, at_far) = frontier[0]["at_entropy"]
    ppl = sorted(pts, key=lambda p: p["entropy_mean"])
    expected = math.sqrt(ppl[0]["gen_ppl"] * ppl[1]["gen_ppl"])  # the log-midpoint
    assert at_mid["entropy"] == mid and at_mid["gen_ppl"] == pytest.approx(expected, rel=1e-9)
    assert at_far == {"entropy": far, "gen_ppl": None}
    # the printed table has a temperature column
    head = table_header(report)
    assert head[:4] == ["arm", "steps (NFE)", "T", "gen-PPL"]
    assert [row[2] for row in format_table(report)] == ["1", "0.5", "1", "0.5", "-"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"temperatures": ()}, "temperatures is empty"),
        ({"temperatures": (1.0, 0.0)}, "temperature=0.0 must be a finite number > 0"),
        ({"temperatures": (0.8, 0.8)}, "repeat a value"),
        ({"match_entropy": (-1.0,)}, "must be an entropy in nats"),
    ],
)
def test_bad_eval_temperatures(kw, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig((4,), 2, 2, 0, **kw)


def test_eval_cli_takes_repeated_temperatures_and_match_entropy(tmp_path, saved_tiny_teacher):
    out = tmp_path / "report.json"
    args = ["eval", "--model", str(saved_tiny_teacher), "--steps", "4", "--samples", "8"]
    args += ["--temperature", "1.0", "--temperature", "0.5", "--match-entropy", "0.1"]
    res = runner.invoke(app, [*args, "--match-entropy", "99", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert [a["temperature"] for a in report["arms"]] == [1.0, 0.5]
    at = report["frontier"][0]["at_entropy"]
    assert [m["entropy"] for m in at] == [0.1, 99.0] and at[1]["gen_ppl"] is None
    assert "4 steps at entropy 99.000 nats: outside the frontier's entropies" in res.output
    bad = runner.invoke(app, ["eval", "--model", str(saved_tiny_teacher), "--temperature", "0"])
    assert bad.exit_code == 2 and "temperature=0.0 must be a finite number > 0" in bad.output


# ---------------------------------------------------------------------------- sample
def test_sample_records_its_temperature(tmp_path, saved_tiny_teacher):
    ckpt = load_checkpoint(saved_tiny_teacher)
    plain = sample_checkpoint(ckpt, 6, steps=4, batch_size=4)
    one = sample_checkpoint(ckpt, 6, steps=4, batch_size=4, temperature=1.0)
    hot = sample_checkpoint(ckpt, 6, steps=4, batch_size=4, temperature=0.5)
    assert plain.temperature == one.temperature == 1.0 and hot.temperature == 0.5
    assert (plain.tokens == one.tokens).all()
    with pytest.raises(ConfigError, match="must be a finite number > 0"):
        sample_checkpoint(ckpt, 2, steps=4, temperature=-1)
    out = tmp_path / "s.jsonl"
    args = ["sample", "--model", str(saved_tiny_teacher), "-n", "3", "--steps", "4"]
    res = runner.invoke(app, [*args, "--temperature", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 samples, 4 steps, T=0.5," in res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["temperature"] for r in rows] == [0.5] * 3
    assert [r["tokens"] for r in rows] == hot.tokens[:3].tolist()


# ---------------------------------------------------------------------------- one sampler
class _Recording:
    """An exact evaluator that keeps every batch of tokens it scores."""

    def __init__(self):
        from tsdfm.models.eval.metrics import ExactEvaluator

        self.inner, self.seen = ExactEvaluator(), []
        self.name = "exact"

    def bind(self, ckpt):
        self.inner = self.inner.bind(ckpt)
        return self

    def nll(self, x):
        self.seen.append(x.clone())
        return self.inner.nll(x)

    def describe(self):
        return self.inner.describe()


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory, saved_tiny_teacher):
    """A student distilled (here: initialised) on an uneven 3-step dataset grid."""
    import torch

    from tsdfm.models.checkpoint import save_checkpoint
    from tsdfm.models.flow_model import student_from_teacher

    teacher = load_checkpoint(saved_tiny_teacher)
    student = student_from_teacher(teacher.model)
    for p in student.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(5))
    times = [0.0, 0.2, 0.7, 1.0]  # far from k / 3: the grid policy shows in the tokens
    student.config = student.config.replace(provenance={"student_steps": 3, "times": times})
    d = tmp_path_factory.mktemp("student") / "student"
    save_checkpoint(d, student, teacher.tokenizer, {"language.json": teacher.data_file()})
    return d


@pytest.mark.parametrize("steps", [3, 4])
def test_sample_and_eval_draw_the_same_tokens(tmp_path, saved_student, steps):
    import torch

    from tsdfm.models.eval.sampling import draw, student_grid
    from tsdfm.models.rng import trajectory_seed

    ckpt = load_checkpoint(saved_student)
    assert (student_grid(ckpt, 3) is not None) and student_grid(ckpt, 4) is None
    out = tmp_path / "s.jsonl"
    args = ["sample", "--model", str(saved_student), "-n", "6", "--steps", str(steps)]
    res = runner.invoke(app, [*args, "--temperature", "0.8", "--seed", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    printed = torch.tensor([json.loads(line)["tokens"] for line in out.read_text().splitlines()])
    recording = _Recording()
    cfg = EvalConfig(steps=(steps,), samples=6, batch_size=4, seed=3, temperatures=(0.8,))
    evaluate_checkpoint(ckpt, cfg, evaluator=recording)
    assert torch.equal(recording.seen[0], printed)  # the first scored batch: the arm
    seeds = trajectory_seed(3, torch.arange(6))
    again = draw(ckpt, seeds, steps, 0.8, batch_size=5).tokens
    assert torch.equal(again, printed)  # independent of the batch size
    if steps == 3:  # its own S: the dataset grid, not the uniform one
        library = sample_checkpoint(ckpt, 6, 3, 3, 4, temperature=0.8)
        assert torch.equal(library.tokens, printed)
        from tsdfm.models.solver import sample

        plain = sample(ckpt.model, ckpt.config.path(), seeds, ckpt.config.seq_len, 3, None, 0.8)
        assert not torch.equal(plain.x_1, printed)
