"""The command line: exit codes, one-line errors, and the eval report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tsdfm.pipeline.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def _error_line(result):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines, "no error message"
    return lines[-1]


def test_eval_on_a_tiny_checkpoint_writes_a_json_report(tmp_path, tiny_teacher, tiny_language):
    from tsdfm.models.checkpoint import save_checkpoint

    d = tmp_path / "teacher"
    save_checkpoint(
        d,
        tiny_teacher,
        tiny_language.tokenizer(),
        {"language.json": json.dumps(tiny_language.to_dict())},
    )
    out = tmp_path / "report.json"
    res = _run(
        "eval",
        "--model",
        str(d),
        "--steps",
        "16",
        "--steps",
        "2",
        "--samples",
        "40",
        "--batch-size",
        "16",
        "--json",
        str(out),
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert [a["steps"] for a in report["arms"]] == [16, 2]
    assert report["true_perplexity"] == pytest.approx(tiny_language.perplexity())
    for arm in report["arms"]:
        assert arm["samples"] == 40 and arm["gen_ppl"] > 1.0 and arm["entropy_mean"] > 0
        assert arm["nfe"] == arm["steps"]
        assert 0 < arm["forwards_per_sample"] <= arm["steps"]
    assert report["real_data"]["gen_ppl"] == pytest.approx(tiny_language.perplexity(), rel=0.1)
    assert "gen-PPL" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--model", "teacher.pt"], "pickle"),
        (["eval", "--model", "/nonexistent/dir"], "not found"),
        (["eval", "--steps", "0"], "must be positive"),
        (["eval", "--device", "cuda"], "no CUDA GPU"),
        (
            ["teacher", "train", "--out", "{tmp}/run", "--source", "gauss", "--steps", "1"],
            "'gauss' is not one of 'mask', 'uniform'",
        ),
        (
            ["teacher", "train", "--out", "{tmp}/run", "--scheduler", "cosine", "--steps", "1"],
            "unknown scheduler 'cosine'",
        ),
        (["teacher", "train", "--out", "{tmp}/run", "--steps", "-3"], "must be a positive"),
        (["teacher", "train", "--out", "{tmp}/run", "--corpus", "{tmp}/none"], "does not exist"),
        (["data", "synthetic", "--out", "{tmp}/l.json", "--branching", "0"], "branching"),
        (
            ["demo", "--out", "{tmp}/demo", "--trajectories-per-shard", "4"],
            "use --trajectories-per-shard 8 or more",
        ),
        (["demo", "--out", "{tmp}/demo", "--eval-samples", "0"], "eval_samples must be a"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = _run(*args)
    assert res.exit_code == 2, res.output
    line = _error_line(res)
    assert line.startswith("error: ") and message in line
    assert "Traceback" not in res.output
    assert not (tmp_path / "demo").exists()  # refused before anything is written


def test_missing_checkpoint_file_is_named(tmp_path, tiny_teacher, tiny_language):
    from tsdfm.models.checkpoint import save_checkpoint

    d = tmp_path / "teacher"
    save_checkpoint(d, tiny_teacher, tiny_language.tokenizer())
    (d / "config.json").unlink()
    res = _run("eval", "--model", str(d))
    assert res.exit_code == 2 and "lacks config.json" in _error_line(res)


def test_data_synthetic_writes_a_language(tmp_path):
    res = _run(
        "data",
        "synthetic",
        "--out",
        str(tmp_path / "lang.json"),
        "--vocab-size",
        "16",
        "--num-states",
        "4",
        "--branching",
        "3",
        "--seq-len",
        "8",
    )
    assert res.exit_code == 0, res.output
    from tsdfm.models.data.synthetic import SyntheticLanguage

    lang = SyntheticLanguage.load(tmp_path / "lang.json")
    assert lang.vocab_size == 16 and lang.seq_len == 8
    assert f"{lang.perplexity():.3f}" in res.output


def test_console_script_is_installed_and_eval_does_not_import_ray():
    script = Path(sys.executable).parent / "tsdfm-pipeline"  # the venv's console script
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "eval" in res.stdout
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from tsdfm.pipeline.cli import app\n"
        "CliRunner().invoke(app, ['eval', '--steps', '1', '--samples', '2'])\n"
        "assert 'ray' not in sys.modules, 'eval imported ray'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _broken_checkpoints(tmp_path, tiny_teacher, tiny_language):
    """Checkpoints whose config.json or tokenizer.json is the wrong kind of file."""
    from tsdfm.models.checkpoint import save_checkpoint

    good = tmp_path / "good"
    save_checkpoint(good, tiny_teacher, tiny_language.tokenizer())
    cfg = json.loads((good / "config.json").read_text())
    out = {}
    for name, change in [
        ("config-list", lambda d: d.write_text("[1, 2]")),
        ("tokens-list", lambda d: d.write_text(json.dumps({**cfg, "special_tokens": [12]}))),
        ("tokenizer-not-json", None),
    ]:
        d = tmp_path / name
        save_checkpoint(d, tiny_teacher, tiny_language.tokenizer())
        if change is None:
            (d / "tokenizer.json").write_text("{this is not json")
        else:
            change(d / "config.json")
        out[name] = d
    return out


def test_broken_checkpoint_files_are_one_line_in_every_command(
    tmp_path, tiny_teacher, tiny_language
):
    """Before: AttributeError / TypeError / a bare tokenizers Exception as a traceback."""
    from tsdfm.models.errors import CheckpointError
    from tsdfm.pipeline.inspect import _tokenizer

    expected = {
        "config-list": "holds a JSON list, not an object",
        "tokens-list": "special_tokens is a JSON list, not an object",
        "tokenizer-not-json": "tokenizer.json is not a readable tokenizer file",
    }
    for name, d in _broken_checkpoints(tmp_path, tiny_teacher, tiny_language).items():
        for args in (
            ["build", "--teacher", str(d), "--k", "1", "--out", str(tmp_path / "ds")],
            ["compass", "train", "--teacher", str(d), "--out", str(tmp_path / "run")],
            ["sample", "--model", str(d)],
            ["eval", "--model", str(d)],
        ):
            res = _run(*args)
            assert res.exit_code == 2, (name, args, res.output)
            assert expected[name] in _error_line(res), (name, args, res.output)
            assert "Traceback" not in res.output
        if name == "tokenizer-not-json":  # inspect reads the teacher's tokenizer directly
            with pytest.raises(CheckpointError, match=expected[name]):
                _tokenizer({"teacher": str(d)})
    assert not (tmp_path / "ds").exists() and not (tmp_path / "run").exists()


def test_a_relative_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import tsdfm.models.checkpoint as checkpoint

    def no_network(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.setattr(checkpoint, "_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    res = _run("sample", "--model", "runs/teacher")
    assert res.exit_code == 2
    assert "checkpoint runs/teacher not found: no such folder" in _error_line(res)


def test_sigterm_stops_a_command_like_ctrl_c(monkeypatch):
    """SIGTERM (what Kubernetes sends) ends in one line and exit 143, not a native abort."""
    import signal
    import time

    import typer

    from tsdfm.pipeline.cli import user_errors

    mini = typer.Typer()
    ran_finally = []

    @mini.command()
    @user_errors
    def work() -> None:
        try:
            signal.raise_signal(signal.SIGTERM)  # in this thread: the handler runs here
            time.sleep(5)
            raise AssertionError("SIGTERM was not handled")
        finally:
            ran_finally.append(True)  # cleanup (stopping the Ray actors) still runs

    before = signal.getsignal(signal.SIGTERM)
    res = runner.invoke(mini, [])
    assert res.exit_code == 143, res.output
    assert _error_line(res) == "terminated (SIGTERM); rerun the same command to resume"
    assert ran_finally == [True]
    assert signal.getsignal(signal.SIGTERM) == before  # put back after the command


def test_sigterm_turned_into_a_plain_keyboard_interrupt_still_exits_143():
    """Ray's waits catch any KeyboardInterrupt a signal handler raises while they poll and
    raise a plain one instead (``check_signals`` in ``_raylet.pyx``): a SIGTERM that lands there
    still ends as SIGTERM (143), and a later Ctrl-C in the same process as Ctrl-C (130)."""
    import signal
    import time

    import typer

    from tsdfm.pipeline.cli import user_errors

    mini = typer.Typer()
    send = {"sig": signal.SIGTERM}

    @mini.command()
    @user_errors
    def work() -> None:
        try:  # what a Ray wait does with the handler's exception
            signal.raise_signal(send["sig"])  # in this thread, not one of Ray's
            time.sleep(5)
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None
        raise AssertionError("the signal was not handled")

    res = runner.invoke(mini, [])
    assert res.exit_code == 143, res.output
    assert _error_line(res) == "terminated (SIGTERM); rerun the same command to resume"
    send["sig"] = signal.SIGINT
    # Python's own Ctrl-C handler, whatever an earlier test in this process left installed
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = runner.invoke(mini, [])
    finally:
        signal.signal(signal.SIGINT, before)
    assert res.exit_code == 130, res.output
    assert _error_line(res) == "interrupted; rerun the same command to resume"


WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


@pytest.mark.parametrize(
    ("command", "literal"),
    [
        (["build"], "org/name[@rev]"),
        (["eval"], "org/name[@rev]"),
        (["verify"], "org/name[@rev]"),
        (["compass", "train"], "org/name[@rev]"),
        (["compass", "eval"], "org/name[@rev]"),
        (["distill"], "org/name[@revision]"),
    ],
)
def test_help_shows_square_brackets_literally(command, literal):
    res = runner.invoke(app, [*command, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert literal in res.output


def test_version_prints_the_package_version():
    from tsdfm.models import __version__

    res = _run("--version")
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"tsdfm-pipeline {__version__}"


@pytest.mark.parametrize(
    "command", [[], ["compass"], ["build"], ["distill"], ["teacher", "train"], ["lm", "train"]]
)
def test_h_is_help_everywhere(command):
    short = runner.invoke(app, [*command, "-h"], env=WIDE)
    long = runner.invoke(app, [*command, "--help"], env=WIDE)
    assert short.exit_code == long.exit_code == 0, short.output
    assert short.output == long.output and "Usage: tsdfm-pipeline" in short.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "--nope"], "No such option: --nope"),
        (["eval", "--steps", "abc"], "Invalid value for '--steps'"),
        (["eval", "--order", "sideways"], "'sideways' is not one of 'random', 'dilated'"),
        (["distill", "--data", "x"], "Missing option"),
        (["teacher", "train", "--out", "x", "--loss", "mse"], "'mse' is not one of 'ce', 'gkl'"),
    ],
)
def test_a_bad_flag_is_one_line_naming_the_help(args, message):
    res = _run(*args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert lines[0].endswith(" -h`)")  # names the help of the command


def test_every_verb_that_reports_takes_json():
    import typer.main

    from tsdfm.pipeline.cli import app

    def leaves(cmd, path=()):
        subs = getattr(cmd, "commands", None)
        if subs is None:
            yield path, cmd
            return
        for name, sub in subs.items():
            yield from leaves(sub, (*path, name))

    reporting = dict(leaves(typer.main.get_command(app)))
    missing = [" ".join(p) for p, c in reporting.items() if "--json" not in _options(c)]
    assert missing == []


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
