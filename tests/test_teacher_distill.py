"""`distill --init <adapter teacher>` for a native masked LM (a tiny random BERT) and the
remote-code families (MDLM-like: time-invariant SUBS; Duo-like: uniform source, conditioned
on σ), then sampling and evaluating the student it saves.

Each dataset is built in-process (ShardBuilder + Manifest, no Ray): one K = 1 shard of the
teacher. The student is the teacher's network plus a zero-initialised step-size branch: at
initialisation its logits are the teacher adapter's, bit for bit. A remote-code student
carries its network's code, loads only with --trust-remote-code and only while that code has
the sha256 its config.json records.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import teacher_zoo as zoo
import torch
from typer.testing import CliRunner

from tsdfm.models.checkpoint import save_checkpoint
from tsdfm.models.errors import CheckpointError
from tsdfm.models.eval.sampling import open_model, sample_checkpoint
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.teachers import open_teacher
from tsdfm.models.teachers.student import AdapterStudent, load_adapter_student, student_code
from tsdfm.models.train.distill import build_student
from tsdfm.pipeline.build import plan_of
from tsdfm.pipeline.cli import app
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.manifest import Manifest
from tsdfm.pipeline.worker import ShardBuilder, identify

runner = CliRunner()
S, N, ROWS = 2, 4, 8


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return zoo.bert(tmp_path_factory.mktemp("zoo") / "bert")


def _dataset(root, teacher, trust_remote_code=False):
    """One committed K = 1 shard of ``teacher`` (S = 2), built without Ray."""
    cfg = BuildConfig(
        str(teacher),
        shards=1,
        trajectories_per_shard=ROWS,
        batch_size=ROWS,
        navigator=NavigatorConfig(S, N, 1),
        trust_remote_code=trust_remote_code,
    )
    prov = identify(cfg)
    manifest = Manifest.create(
        str(root), plan_of(cfg), prov.fingerprint, prov.tokenizer_identity, prov.teacher
    )
    res = ShardBuilder(cfg, str(root), planned=prov).build(0)
    manifest.record_shard(res.info, res.counters, res.stats)
    return root


@pytest.fixture(scope="module")
def bert_dataset(tmp_path_factory, bert):
    return _dataset(tmp_path_factory.mktemp("data") / "bert", bert)


def _inputs(ckpt, B=4):
    V, L = ckpt.config.vocab_size, ckpt.config.seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, L), generator=g)
    if ckpt.config.source == "mask":
        x[torch.rand(B, L, generator=g) < 0.6] = V  # [MASK] = V
    t = torch.tensor([0.0, 0.25, 0.5, 0.9])[:B]
    h = torch.tensor([0.5, 0.25, 0.125, 0.1])[:B]
    return x, t, h


def test_the_student_starts_as_the_teacher(bert):
    teacher = open_teacher(bert)
    student = build_student(teacher, seed=0).eval()
    assert isinstance(student, AdapterStudent)
    assert student.config.role == "student" and student.config.data["family"] == "masked-lm"
    x, t, h = _inputs(teacher)
    with torch.no_grad():
        want = teacher.model(x, t)
        got = student(x, t, h)
        assert torch.equal(got, want)
        # the branch is live: a non-zero output layer moves the masked positions only
        torch.nn.init.normal_(student.h_out.bias)
        moved = student(x, t, h)
    masked = x == teacher.config.vocab_size
    assert not torch.allclose(moved[masked], want[masked])
    assert torch.equal(moved[~masked], want[~masked])  # revealed tokens stay carried over


def test_distill_an_adapter_teacher_then_sample_the_student(bert, bert_dataset, tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--data", bert_dataset, "--init", bert, "--out", run, "--steps", 2]
    args += ["--batch-size", 4, "--num-workers", 0, "--device", "cpu", "--heldout-fraction", 0]
    res = runner.invoke(app, [str(a) for a in args])  # the final eval skips a text student
    assert res.exit_code == 0, res.output
    final = run / "final"
    ckpt = load_adapter_student(final)
    assert isinstance(ckpt.model, AdapterStudent)
    prov = ckpt.config.provenance
    assert prov["student_steps"] == S and prov["steps"] == 2
    teacher = open_teacher(bert)
    assert prov["teacher_identity"] == teacher.identity
    # it trained: the step branch moved off zero, and the saved weights are what loads
    assert ckpt.model.h_out.weight.abs().sum() > 0
    assert open_model(final).identity == ckpt.identity
    x, t, h = _inputs(teacher)
    with torch.no_grad():
        assert not torch.equal(ckpt.model(x, t, h), teacher.model(x, t))

    out = sample_checkpoint(ckpt, 2, seed=0)
    V = ckpt.config.vocab_size
    assert out.tokens.shape == (2, ckpt.config.seq_len) and out.steps == S
    assert int(out.tokens.max()) < V and int(out.tokens.min()) >= 0  # data tokens, no [MASK]
    assert len(out.texts) == 2 and all(isinstance(s, str) for s in out.texts)
    again = sample_checkpoint(load_adapter_student(final), 2, seed=0)
    assert torch.equal(again.tokens, out.tokens)  # the reloaded student samples the same
    assert torch.equal(out.seeds, trajectory_seed(0, torch.arange(2)))
    # the sample command reads the same student and draws the same tokens
    jsonl = tmp_path / "s.jsonl"
    res = runner.invoke(app, ["sample", "--model", str(final), "-n", "2", "--out", str(jsonl)])
    assert res.exit_code == 0, res.output
    assert len(jsonl.read_text().splitlines()) == 2


@pytest.fixture(scope="module")
def word_gpt2(tmp_path_factory):
    """A tiny random GPT-2 over the zoo's words (its own tokenizer), saved for ``hf:DIR``."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok, vocab = zoo.word_tokenizer(["<|endoftext|>", "[UNK]"])
    eos = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos)
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    d = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


def test_eval_of_the_adapter_student_under_a_local_causal_lm(
    bert, bert_dataset, word_gpt2, tmp_path
):
    from tsdfm.models.eval.evaluate import EvalConfig, evaluate_checkpoint
    from tsdfm.models.eval.evaluators import load_evaluator
    from tsdfm.models.eval.sampling import draw

    run = tmp_path / "run"
    args = ["distill", "--data", bert_dataset, "--init", bert, "--out", run, "--steps", 1]
    args += ["--batch-size", 4, "--num-workers", 0, "--device", "cpu", "--eval-samples", 0]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    ckpt = open_model(run / "final")
    evaluator = load_evaluator(f"hf:{word_gpt2}")
    report = evaluate_checkpoint(ckpt, EvalConfig((S,), 4, 4, 0), evaluator=evaluator)
    arm = report["arms"][0]
    # the arm's gen-PPL is exp(Σ NLL / Σ T) of the same seeds' samples under that evaluator
    d = draw(ckpt, trajectory_seed(0, torch.arange(4)), S)
    nll, n = evaluator.bind(ckpt).nll(d.tokens)
    assert arm["steps"] == S and float(n.sum()) > 0
    assert arm["gen_ppl"] == pytest.approx(float(torch.exp(nll.sum() / n.sum())), rel=1e-6)
    # and the eval command, with the same evaluator, reports the same number
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(run / "final"), "--steps", S, "--samples", 4]
    args += ["--batch-size", 4, "--evaluator", f"hf:{word_gpt2}", "--json", out]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())["arms"][0]["gen_ppl"]
    assert got == pytest.approx(arm["gen_ppl"], rel=1e-6)


# --------------------------------------------------------------------------- remote code
REMOTE = {"mdlm_like": ("mdlm", "mask"), "duo_like": ("duo", "uniform")}


def _one_line_refusal(res, *needles):
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module", params=sorted(REMOTE))
def remote(request, tmp_path_factory):
    """(maker, teacher folder, its K = 1 dataset) of a remote-code family."""
    maker = request.param
    teacher = getattr(zoo, maker)(tmp_path_factory.mktemp("zoo") / maker)
    data = _dataset(tmp_path_factory.mktemp("data") / maker, teacher, trust_remote_code=True)
    return maker, teacher, data


def _code(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.py"))}


def test_a_remote_code_student_starts_as_the_teacher(remote):
    maker, teacher_dir, _ = remote
    family, source = REMOTE[maker]
    teacher = open_teacher(teacher_dir, trust_remote_code=True)
    student = build_student(teacher, seed=0).eval()
    assert isinstance(student, AdapterStudent)
    data = student.config.data
    assert data["family"] == family and student.config.source == source
    # the code it will carry: the auto_map modules (and their local import), hashed
    want = {n: hashlib.sha256(b).hexdigest() for n, b in _code(teacher_dir).items()}
    assert data["remote_code"]["files"] == want and len(want) == 2
    assert student_code(teacher) == _code(teacher_dir)
    x, t, h = _inputs(teacher)
    with torch.no_grad():
        assert torch.equal(student(x, t, h), teacher.model(x, t))


def test_distill_sample_and_eval_a_remote_code_student(remote, word_gpt2, tmp_path):
    maker, teacher_dir, data = remote
    family, source = REMOTE[maker]
    run = tmp_path / "run"
    args = ["distill", "--data", data, "--init", teacher_dir, "--out", run, "--steps", 2]
    args += ["--batch-size", 4, "--num-workers", 0, "--device", "cpu", "--heldout-fraction", 0]
    args = [str(a) for a in args]
    _one_line_refusal(runner.invoke(app, args), "--trust-remote-code")
    assert not run.exists() or not (run / "final").exists()
    res = runner.invoke(app, [*args, "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    final = run / "final"
    # the final and every intermediate checkpoint carry the teacher's code, byte for byte
    for folder in (final, *sorted(run.glob("checkpoints/step-*"))):
        assert _code(folder) == _code(teacher_dir), folder
    assert (run / "checkpoints" / "step-0000002").is_dir()

    # it loads only with the flag, refused in one line naming it
    with pytest.raises(CheckpointError, match="--trust-remote-code") as e:
        load_adapter_student(final)
    assert "\n" not in str(e.value)
    ckpt = load_adapter_student(final, trust_remote_code=True)
    assert ckpt.config.source == source and ckpt.config.data["family"] == family
    assert ckpt.model.teacher.time_input == ("sigma" if family == "duo" else "none")
    teacher = open_teacher(teacher_dir, trust_remote_code=True)
    assert ckpt.config.provenance["teacher_identity"] == teacher.identity
    assert ckpt.model.h_out.weight.abs().sum() > 0  # it trained
    x, t, h = _inputs(teacher)
    with torch.no_grad():
        got = ckpt.model(x, t, h)
        assert not torch.equal(got, teacher.model(x, t))
        if family == "duo":  # the time input carried over: σ(t) moves the logits
            assert not torch.allclose(ckpt.model(x, 1 - t, h), got)
    assert open_model(final, trust_remote_code=True).identity == ckpt.identity

    # sample: refused without the flag; with it, data tokens only, same as the API
    jsonl = tmp_path / "s.jsonl"
    sample = ["sample", "--model", str(final), "-n", "2", "--out", str(jsonl), "--device", "cpu"]
    _one_line_refusal(runner.invoke(app, sample), "--trust-remote-code")
    res = runner.invoke(app, [*sample, "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line)["tokens"] for line in jsonl.read_text().splitlines()]
    out = sample_checkpoint(ckpt, 2, seed=0)
    assert rows == out.tokens.tolist() and out.steps == S
    assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < ckpt.config.vocab_size

    # eval with a local causal LM: the command's gen-PPL is the API's
    from tsdfm.models.eval.evaluate import EvalConfig, evaluate_checkpoint
    from tsdfm.models.eval.evaluators import load_evaluator

    report = evaluate_checkpoint(
        ckpt, EvalConfig((S,), 4, 4, 0), evaluator=load_evaluator(f"hf:{word_gpt2}")
    )
    eval_json = tmp_path / "eval.json"
    ev = ["eval", "--model", str(final), "--steps", str(S), "--samples", "4", "--batch-size", "4"]
    ev += ["--evaluator", f"hf:{word_gpt2}", "--json", str(eval_json), "--device", "cpu"]
    _one_line_refusal(runner.invoke(app, ev), "--trust-remote-code")
    res = runner.invoke(app, [*ev, "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    got = json.loads(eval_json.read_text())["arms"][0]["gen_ppl"]
    assert got == pytest.approx(report["arms"][0]["gen_ppl"], rel=1e-6) and got > 0

    # distill continues the student itself (--init the student): it carries the code on
    more = tmp_path / "more"
    again = ["distill", "--data", data, "--init", final, "--out", more, "--steps", 1]
    again += ["--batch-size", 4, "--num-workers", 0, "--device", "cpu", "--trust-remote-code"]
    res = runner.invoke(app, [str(a) for a in again])
    assert res.exit_code == 0, res.output
    assert _code(more / "final") == _code(teacher_dir)


def test_a_tampered_student_code_file_is_refused(remote, tmp_path):
    _, teacher_dir, _ = remote
    teacher = open_teacher(teacher_dir, trust_remote_code=True)
    student = build_student(teacher, seed=0)
    folder = tmp_path / "student"
    save_checkpoint(folder, student, teacher.tokenizer.tokenizer, student_code(teacher))
    assert load_adapter_student(folder, trust_remote_code=True).identity
    modeling = next(folder.glob("modeling_*.py"))
    with modeling.open("a") as f:
        f.write("\nprint('not the recorded code')\n")
    with pytest.raises(CheckpointError, match=modeling.name) as e:
        load_adapter_student(folder, trust_remote_code=True)
    assert "sha256" in str(e.value) and "\n" not in str(e.value)
    sample = ["sample", "--model", str(folder), "-n", "1", "--device", "cpu"]
    _one_line_refusal(runner.invoke(app, [*sample, "--trust-remote-code"]), modeling.name)
    # a local module the recorded code imports but config.json does not record is not run
    # either, even when the importing file's new hash is written into config.json
    other = tmp_path / "unrecorded"
    shutil.copytree(folder, other)
    source = (teacher_dir / modeling.name).read_bytes() + b"\nfrom .helpers import X  # noqa\n"
    (other / modeling.name).write_bytes(source)
    (other / "helpers.py").write_text("X = 1\n")
    config = json.loads((other / "config.json").read_text())
    config["data"]["remote_code"]["files"][modeling.name] = hashlib.sha256(source).hexdigest()
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"helpers\.py is not among the code files"):
        load_adapter_student(other, trust_remote_code=True)
