"""The scale benchmark's quick preset end to end: its JSON fields and that its parts add up."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import scale

    out = tmp_path_factory.mktemp("scale") / "scale-quick"
    r = scale.main(["--quick", "--trajectories", "1", "--out", str(out)])
    assert json.loads(Path(f"{out}.json").read_text()) == json.loads(json.dumps(r))
    assert Path(f"{out}.md").read_text().startswith("# Scale benchmark (quick preset)")
    return r


def test_the_parts_of_actor_time_add_up_to_the_build(result):
    for arm in result["arms"]:
        build = arm["counters"]["build_seconds"]
        assert sum(arm["parts_seconds"].values()) == pytest.approx(build, rel=1e-9)
        assert sum(arm["shares"].values()) == pytest.approx(1.0, abs=1e-9)
        assert all(v >= 0 for k, v in arm["parts_seconds"].items() if k != "navigator_other")
        fwd = arm["parts_seconds"]["teacher_forward"] + arm["parts_seconds"]["compass_forward"]
        assert arm["forward_share"] == pytest.approx(fwd / build)
    assert result["arms"][0]["parts_seconds"]["compass_forward"] == 0  # K = 1: no compass


def test_the_figures_describe_the_run(result):
    s, f = result["shape"], result["figures"]
    k1, k8 = result["arms"]
    assert (k1["K"], k8["K"]) == (1, 8)
    assert s["trajectories"] == k1["shard"]["rows"] == k8["shard"]["rows"] == 1
    assert f["logits_bytes_per_row"] == s["seq_len"] * s["vocab_size"] * 4
    t = result["models"]["teacher"]
    # 2·P·L + 4·layers·L²·d, with P the per-token matmul weights
    assert (
        t["flops_per_row_forward"]
        == 2 * t["matmul_parameters"] * s["seq_len"]
        + 4 * t["n_layers"] * s["seq_len"] ** 2 * t["d_model"]
    )
    # the teacher's blocks and head: 12·d² per block (+ biases not counted) and d·V
    d, V = t["d_model"], s["vocab_size"]
    assert t["matmul_parameters"] == t["n_layers"] * 12 * d * d + d * V
    assert f["actor_peak_rss_bytes_K8"] >= k8["memory"]["after_load_rss_bytes"] > 0
    assert f["driver_peak_rss_bytes"] > 0
    jr = k1["jump_rule"]
    assert jr["last_step"]["positions_moved"] == s["seq_len"]  # q = 1: every masked position
    # at the blind plan a lane's forwards are at most L + 1 and at least one per reveal step
    p1, p8 = result["production_forward_counts"]
    assert 1 <= p1["teacher_row_forwards_per_trajectory"] <= s["seq_len"] + 1
    assert p8["compass_rows_per_trajectory"] == 8 * 8  # K rows in each of the S = 8 segments
    assert k1["teacher_row_forwards_per_trajectory"] == s["teacher_steps"]  # L ≫ N: all move
    for version, g in f["by_schema_version"].items():
        assert g["bytes_per_trajectory_K1"] > 0, version
    assert f["bytes_per_trajectory_K1"] == k1["shard"]["bytes"]
    assert result["device"]["machine_shared"] is True
