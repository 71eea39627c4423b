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
    p = shaping.PRESETS["ci"]
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
    sizes = {d["name"]: d["trajectories"] for d in saved["datasets"]}
    assert sizes["blind"] == p.trajectories
    assert sizes[f"blind x{p.control_factor} data"] == p.trajectories * p.control_factor
    shaped = next(d for d in saved["datasets"] if d["name"] == f"shaped K={p.candidates}")
    assert shaped["energy_gain"] > 0
    assert {t["goal"] for t in saved["targets"]} >= {"≤ 0.68", "≤ 0.8", "< 1"}
    assert Path(f"{out}-steps.png").stat().st_size > 1000
    assert Path(f"{out}-entropy.png").stat().st_size > 1000
    assert "## Targets" in Path(f"{out}.md").read_text()

    # rerun: everything is cached or resumed, and the numbers are identical
    again = shaping.run("synthetic", "ci", tmp_path / "work", str(out), "cpu", args)
    assert again["rows"] == result["rows"]
