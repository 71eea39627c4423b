"""The shaping benchmark's smallest preset end to end, and the schema of its results."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_ci_preset_runs_end_to_end_and_writes_the_documented_schema(tmp_path):
    import shaping

    args = Namespace(teacher=None, compass=None, distill_steps=None)
    out = tmp_path / "results" / "shaping-synthetic"
    result = shaping.run("synthetic", "ci", tmp_path / "work", str(out), "cpu", args)

    saved = json.loads(Path(f"{out}.json").read_text())
    assert saved["schema"] == shaping.SCHEMA and saved["preset"] == "ci"
    for key in ("rows", "datasets", "targets", "device", "command", "real_data", "config"):
        assert key in saved
    p = shaping.PRESETS["synthetic"]["ci"]
    arms = {r["arm"] for r in saved["rows"]}
    for steps in p.teacher_eval_steps:
        assert f"teacher, {steps} steps" in arms
    for steps in p.student_eval_steps:
        assert f"student from blind, {steps} steps" in arms
        assert f"student from shaped K={p.candidates}, {steps} steps" in arms
    assert f"student from blind x{p.control_factor} data, {p.student_steps} steps" in arms
    assert f"student from shaped K=2, {p.student_steps} steps" in arms
    assert f"student from shaped K={p.candidates} tau=0.5, {p.student_steps} steps" in arms
    assert any(r["kind"] == "search control" for r in saved["rows"])
    for r in saved["rows"]:
        assert len(r["gen_ppl"]["per_seed"]) == p.seeds
        assert 1.0 < r["gen_ppl"]["mean"] < 1e6  # 1-step samples are near-random
        assert r["scores"]["exact"]["gen_ppl"] == r["gen_ppl"]
        assert set(r["distinct"]) == {"1", "2", "3", "4"}
        assert 0.0 < r["distinct"]["1"] <= 1.0
    sizes = {d["name"]: d["trajectories"] for d in saved["datasets"]}
    assert sizes["blind"] == p.trajectories
    assert sizes[f"blind x{p.control_factor} data"] == p.trajectories * p.control_factor
    shaped = next(d for d in saved["datasets"] if d["name"] == f"shaped K={p.candidates}")
    assert shaped["energy_gain"] > 0
    assert {t["goal"] for t in saved["targets"]} >= {"≤ 0.68", "≤ 0.8", "< 1"}
    assert {t["evaluator"] for t in saved["targets"]} == {"exact"}
    # the exact evaluator's real-data perplexity is the language's, near its true value
    assert 1.0 < saved["real_data"]["gen_ppl"] < 1e3
    assert Path(f"{out}-steps.png").stat().st_size > 1000
    assert Path(f"{out}-entropy.png").stat().st_size > 1000
    assert "## Targets" in Path(f"{out}.md").read_text()

    # rerun: everything is cached or resumed, and the numbers are identical
    again = shaping.run("synthetic", "ci", tmp_path / "work", str(out), "cpu", args)
    assert again["rows"] == result["rows"]
    assert [i["seconds"] for i in again["invocations"]] == [result["seconds"], again["seconds"]]
    assert again["seconds_total"] == result["seconds"] + again["seconds"]


def test_text_ci_preset_trains_its_models_and_scores_with_the_in_project_lm(tmp_path):
    import shaping

    args = Namespace(teacher=None, compass=None, distill_steps=None)
    out = tmp_path / "results" / "shaping-text"
    result = shaping.run("text", "ci", tmp_path / "work", str(out), "cpu", args)

    work = tmp_path / "work"
    for part in ("teacher", "lm", "compass"):
        assert (work / part / "final" / "config.json").is_file(), part
    assert result["models"]["lm"] == str(work / "lm" / "final")
    assert [e["name"] for e in result["evaluators"]] == ["lm"]  # SmolLM2 is off in ci
    p = shaping.PRESETS["text"]["ci"]
    arms = {r["arm"] for r in result["rows"]}
    assert f"student from shaped K={p.candidates}, {p.student_steps} steps" in arms
    for r in result["rows"]:
        assert len(r["scores"]["lm"]["gen_ppl"]["per_seed"]) == p.seeds
        # a 30-step LM is weak but far better than uniform over the 300-token vocabulary
        assert 1.0 < r["gen_ppl"]["mean"] < 1e5
    assert result["real_data"]["gen_ppl"] < min(r["gen_ppl"]["mean"] for r in result["rows"])
    assert {t["evaluator"] for t in result["targets"]} == {"lm"}
    assert "gen-PPL (lm)" in Path(f"{out}.md").read_text()

    # rerun: models are not retrained, samples and scores come from the cache
    stamp = (work / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns
    again = shaping.run("text", "ci", tmp_path / "work", str(out), "cpu", args)
    assert again["rows"] == result["rows"]
    assert (work / "teacher" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
