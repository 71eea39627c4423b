"""The demo's loop end to end on tiny settings (the real one runs from the README)."""

import json

import pytest

from tsdfm.models.errors import ConfigError
from tsdfm.pipeline.demo import DemoConfig, format_results, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def test_demo_runs_the_whole_loop_and_resumes(tmp_path):
    cfg = DemoConfig(
        shards=2,
        trajectories_per_shard=4,
        teacher_steps=32,
        candidates=3,
        distill_steps=3,
        distill_batch=8,
        eval_samples=20,
    )
    lines: list[str] = []
    result = run_demo(tmp_path, cfg, log=lines.append)
    arms = [r["arm"] for r in result.rows]
    match = result.entropy_match
    matched_arm = f"student from blind data, 8 steps, T={match['temperature']:.3f} " + (
        "(entropy of the shaped student)" if match["converged"] else "(nearest the shaped entropy)"
    )
    assert arms == [
        "teacher, 32 steps",
        "teacher, 8 steps",
        "student from blind data, 8 steps",
        "student from shaped data, 8 steps",
        matched_arm,
        "real data (the language itself)",
    ]
    for r in result.rows:
        assert 1.0 < r["gen_ppl"] < 128 and 0.0 < r["entropy"] < 5.0
    # the blind student at the T (bisection in [0.3, 1]) matching the shaped student's entropy
    blind, shaped, matched = result.rows[2:5]
    assert match["target_entropy"] == shaped["entropy"]
    assert 0.3 <= match["temperature"] <= 1.0 and match["evaluations"] <= 6
    assert matched["temperature"] == match["temperature"]
    assert matched["entropy"] == match["entropy"]
    closest = min(abs(e - shaped["entropy"]) for _, e in match["tried"])
    assert abs(matched["entropy"] - shaped["entropy"]) == closest
    assert match["converged"] == (closest < 0.005)
    if blind["entropy"] < shaped["entropy"]:  # T = 1 already has too little entropy
        assert match["temperature"] == 1.0 and match["evaluations"] == 0
    said = f"  blind student at T={match['temperature']:.3f}: entropy {match['entropy']:.3f}"
    assert any(line.startswith(said) for line in lines)
    # K=3 shaping chose lower energies than the candidates' mean
    assert result.datasets["shaped"]["gain"] > 0
    assert result.datasets["blind"]["gain"] is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result.rows))
    assert "| student from shaped data, 8 steps | 8 |" in format_results(result)
    assert any(line.startswith("  data-shaped: OK") for line in lines)

    again: list[str] = []
    run_demo(tmp_path, cfg, log=again.append)
    assert any("0 shard(s) built, 2 kept" in line for line in again)


def test_the_demo_never_evaluates_on_the_datasets_random_streams():
    """Sample i of seed s draws from stream s * 2**32 + i: evaluating with the datasets' seed
    would score the teacher on the blind dataset's own finals. The default seeds differ."""
    cfg = DemoConfig()
    assert cfg.eval_seed != cfg.seed
    with pytest.raises(ConfigError, match="eval_seed 3 equals the datasets' seed"):
        DemoConfig(seed=3, eval_seed=3)
