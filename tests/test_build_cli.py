"""`build` and `inspect` through the command line (real Ray, tiny teacher)."""

import json
import socket

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tsdfm.pipeline.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("ray_cluster")


def _build(*args):
    return runner.invoke(app, ["build", *map(str, args)])


def _small(teacher, out, *extra):
    return _build(
        "--teacher",
        teacher,
        "--out",
        out,
        "--shards",
        2,
        "--trajectories-per-shard",
        4,
        "--batch-size",
        4,
        "-S",
        4,
        "-N",
        16,
        "--k",
        1,
        "--device",
        "cpu",
        *extra,
    )


def test_build_then_inspect(tmp_path, saved_tiny_teacher):
    out = tmp_path / "ds"
    res = _small(saved_tiny_teacher, out)
    assert res.exit_code == 0, res.output
    assert "shards 2/2  rows 8" in res.output and "trajectories/s" in res.output
    again = _small(saved_tiny_teacher, out)
    assert again.exit_code == 0 and "skipped 2" in again.output
    shown = runner.invoke(app, ["inspect", str(out), "--example", "5"])
    assert shown.exit_code == 0, shown.output
    text = shown.output
    assert "shards: 2/2 committed, rows 8" in text
    # schema v2 (mask source): final tokens and each position's reveal segment, not S+1 states
    assert "schema v2" in text and "reveal: list<element: int16" in text
    assert "tokens: list<element: int32" in text and "states:" not in text
    assert "trajectory 5 (seed 5)" in text
    assert text.count("t=") == 5  # S+1 states shown step by step
    assert "energy: not shaped" in text
    # the same report as JSON: the text is its rendering
    report_path = tmp_path / "inspect.json"
    shown = runner.invoke(app, ["inspect", str(out), "--example", "5", "--json", str(report_path)])
    assert shown.exit_code == 0, shown.output
    report = json.loads(report_path.read_text())
    assert report["trajectory"]["id"] == 5 and report["trajectory"]["seed"] == 5
    assert len(report["trajectory"]["steps"]) == 5 and report["energy"] is None
    assert report["trajectory"]["steps"][0]["tokens"] == [
        max(report["trajectory"]["steps"][0]["tokens"])
    ] * len(report["trajectory"]["steps"][0]["tokens"])
    assert report["shards_committed"] == 2 and report["rows"] == 8
    assert report["invariants"].startswith("row invariants: all 4 rows of shard 1 keep them")
    # an id outside the dataset is refused (before: trajectory 0 was shown instead)
    shown = runner.invoke(app, ["inspect", str(out), "--example", "999"])
    assert shown.exit_code == 2
    assert "error: --example 999 is not a trajectory of" in shown.output
    assert "ids run from 0 to 7" in shown.output


def test_tempered_blind_build_is_a_new_dataset_that_replays_byte_exactly(
    tmp_path, saved_tiny_teacher
):
    import json

    from tsdfm.pipeline.card import read_card
    from tsdfm.pipeline.manifest import Manifest
    from tsdfm.pipeline.shards import read_shard
    from tsdfm.pipeline.verify import verify

    plain, tempered = tmp_path / "plain", tmp_path / "tempered"
    assert _small(saved_tiny_teacher, plain).exit_code == 0
    # T = 1 spelled out is the same dataset: same fingerprint, so the rerun skips every shard
    again = _small(saved_tiny_teacher, plain, "--teacher-temperature", "1.0")
    assert again.exit_code == 0 and "skipped 2" in again.output, again.output
    res = _small(saved_tiny_teacher, tempered, "--teacher-temperature", "0.7")
    assert res.exit_code == 0, res.output
    m_plain, m_temp = Manifest.load(str(plain)), Manifest.load(str(tempered))
    assert m_plain.fingerprint != m_temp.fingerprint
    assert (
        "teacher_temperature"
        not in json.loads((plain / "manifest.json").read_text())["plan"]["config"]["navigator"]
    )  # the default is not recorded: older datasets keep their bytes
    assert m_temp.plan["config"]["navigator"]["teacher_temperature"] == 0.7
    table_p, _ = read_shard(str(plain), "data/train-00000-of-00002.parquet")
    table_t, meta = read_shard(str(tempered), "data/train-00000-of-00002.parquet")
    assert meta["config"]["navigator"]["teacher_temperature"] == 0.7
    from tsdfm.models.data.schema import decode_rows

    assert not (decode_rows(table_p).states == decode_rows(table_t).states).all()
    # rebuilt from the recorded config, the tempered shards have the recorded bytes
    report = verify(str(tempered), replay=2)
    assert report.ok, report.format()
    assert report.replayed == [0, 1]
    card = read_card(str(tempered))
    assert card[0]["pretty_name"].endswith("teacher T=0.7)")
    assert "softmax(logits / T) with T = 0.7" in card[1]
    assert "T = 0.7" not in read_card(str(plain))[1]
    shown = runner.invoke(app, ["inspect", str(tempered)])
    assert shown.exit_code == 0 and "teacher_temperature=0.7" in shown.output


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shards", "0"], "shards=0 must be a positive integer"),
        (["--k", "0"], "K=0 must be at least 1"),
        (["-N", "30"], "teacher_steps=30 is not divisible by student_steps=4"),
        (["--tau", "2"], "tau=2.0 must lie in [0, 1]"),
        (["--k", "4"], "need a compass"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--precision", "fp8"], "'fp8' is not one of 'fp32', 'bf16'"),
        (["--selection-temperature", "0"], "temperature=0.0 must be positive"),
        (["--teacher-temperature", "0"], "teacher_temperature=0.0 must be a finite number > 0"),
        (["--num-workers", "-1"], "--num-workers -1 must be at least 1"),
        (["--max-retries", "-1"], "--max-retries -1 must be 0 or more"),
        (["--out", "memory://ds"], "a memory:// filesystem lives in one process"),
        (["--out", "nosuch://bucket/ds"], "Protocol not known: nosuch"),
        (
            ["--temperature", "0.5"],
            "use --selection-temperature for the softmax selection or --teacher-temperature "
            "for the teacher's draws",
        ),
    ],
)
def test_bad_build_flags(tmp_path, saved_tiny_teacher, extra, message):
    res = _small(saved_tiny_teacher, tmp_path / "ds", *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output.strip().splitlines()[-1]
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_token_softmax_needs_shared_positions_and_a_token_ratio_compass(
    tmp_path, saved_tiny_teacher, saved_tiny_compass
):
    extra = ["--k", "4", "--compass", saved_tiny_compass, "--selection", "token-softmax"]
    res = _small(saved_tiny_teacher, tmp_path / "a", *extra)
    assert res.exit_code == 2, res.output
    assert "add --shared-reveals or --reveal-order dilated" in res.output.strip().splitlines()[-1]
    res = _small(saved_tiny_teacher, tmp_path / "b", *extra, "--shared-reveals")
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert "needs per-position log-ratios" in last and "--head tokens" in last
    assert not (tmp_path / "b" / "manifest.json").exists()


def _token_compass(tmp_path, teacher_dir, tiny_language):
    """A random token-ratio compass for the tiny teacher (dilated plan, S = 4)."""
    from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
    from tsdfm.models.compass import compass_config
    from tsdfm.models.flow_model import CompassModel
    from tsdfm.models.train.common import seeded

    teacher = load_checkpoint(teacher_dir)
    prov = {"teacher_identity": teacher.identity, "reveal_order": "dilated", "student_steps": 4}
    cfg = compass_config(teacher.config, 16, 1, 2, provenance=prov, head="tokens")
    with seeded(2):
        model = CompassModel(cfg).eval()
        torch.nn.init.normal_(model.backbone.out.weight, std=0.5)
    save_checkpoint(tmp_path / "token-compass", model, tiny_language.tokenizer())
    return tmp_path / "token-compass"


def test_tilt_builds_a_verified_dataset_and_refuses_bad_plans_in_one_line(
    tmp_path, saved_tiny_teacher, saved_tiny_compass, tiny_language
):
    """`--selection tilt` through Ray: K = 1, one teacher step per segment, dilated; every
    segment is shaped and records the kept state's energy; verify passes; without a token-ratio
    compass, with K > 1 or with N ≠ S it is refused before anything is written."""
    from tsdfm.models.data.schema import decode_rows
    from tsdfm.pipeline.shards import read_shard

    token = _token_compass(tmp_path, saved_tiny_teacher, tiny_language)
    plan = ["--k", "1", "-N", "4", "--reveal-order", "dilated", "--selection", "tilt"]
    res = _small(saved_tiny_teacher, tmp_path / "ds", "--compass", token, *plan)
    assert res.exit_code == 0, res.output
    card = (tmp_path / "ds" / "README.md").read_text()
    assert "tilted teacher" in card
    root = tmp_path / "ds"
    first = sorted(root.rglob("*.parquet"))[0].relative_to(root)
    rows = decode_rows(read_shard(str(root), str(first))[0])
    assert rows.shaped.all() and rows.energies.shape[2] == 1 and (rows.chosen == 0).all()
    assert np.isfinite(rows.energies).all() and (rows.energies != 0).any()
    checked = runner.invoke(app, ["verify", str(root)])
    assert checked.exit_code == 0, checked.output
    refusals = {
        "needs per-position log-ratios": ["--compass", saved_tiny_compass, *plan],
        "use K = 1 (--k 1)": ["--compass", token, *plan, "--k", "4"],
        "--teacher-steps 4 --reveal-order dilated": ["--compass", token, *plan, "-N", "16"],
        "pass --compass CKPT": plan,
    }
    for i, (want, extra) in enumerate(refusals.items()):
        bad = _small(saved_tiny_teacher, tmp_path / f"bad{i}", *extra)
        assert bad.exit_code == 2, (want, bad.output)
        assert want in bad.output.strip().splitlines()[-1], (want, bad.output)
        assert not (tmp_path / f"bad{i}" / "manifest.json").exists()


def test_bad_checkpoints_and_outputs(tmp_path, saved_tiny_teacher):
    (tmp_path / "t.pt").write_bytes(b"x")
    res = _small(tmp_path / "t.pt", tmp_path / "a")
    assert res.exit_code == 2 and "pickle" in res.output
    res = _small(tmp_path / "missing", tmp_path / "a")
    assert res.exit_code == 2 and "not found" in res.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    res = _small(saved_tiny_teacher, other)
    assert res.exit_code == 2 and "holds no tsdfm dataset" in res.output
    res = runner.invoke(app, ["inspect", str(other)])
    assert res.exit_code == 2 and "not a tsdfm trajectory dataset" in res.output


def test_unreachable_ray_address_fails_fast():
    """`--address` is probed before ray.init, which would otherwise retry for minutes."""
    from tsdfm.models.errors import ConfigError
    from tsdfm.pipeline.executor import BuildError, _probe

    with pytest.raises(BuildError, match=r"no Ray head node reachable at 127\.0\.0\.1"):
        _probe(f"127.0.0.1:{_closed_port()}", timeout=1.0)
    with pytest.raises(ConfigError, match="is not host:port"):
        _probe("nonsense")
