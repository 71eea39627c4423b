"""`build` and `inspect` through the command line (real Ray, tiny teacher)."""

import socket

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

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
    assert "states: list<element: list<element: int32" in text
    assert "trajectory 5 (seed 5)" in text
    assert text.count("t=") == 5  # S+1 states shown step by step
    assert "energy: not shaped" in text


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
        (["--precision", "fp8"], "precision 'fp8'"),
    ],
)
def test_bad_build_flags(tmp_path, saved_tiny_teacher, extra, message):
    res = _small(saved_tiny_teacher, tmp_path / "ds", *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output.strip().splitlines()[-1]
    assert not (tmp_path / "ds" / "manifest.json").exists()


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
    from models.errors import ConfigError
    from pipeline.executor import BuildError, _probe

    with pytest.raises(BuildError, match=r"no Ray head node reachable at 127\.0\.0\.1"):
        _probe(f"127.0.0.1:{_closed_port()}", timeout=1.0)
    with pytest.raises(ConfigError, match="is not host:port"):
        _probe("nonsense")
