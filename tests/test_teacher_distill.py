"""`distill --init <adapter teacher>` for a native masked LM (a tiny random BERT), then
sampling the student it saves.

The dataset is built in-process (ShardBuilder + Manifest, no Ray): one K = 1 shard of the
BERT teacher. The student is the teacher's network plus a zero-initialised step-size branch:
at initialisation its logits are the teacher adapter's, bit for bit.
"""

from __future__ import annotations

import json

import pytest
import teacher_zoo as zoo
import torch
from typer.testing import CliRunner

from tsdfm.models.eval.sampling import open_model, sample_checkpoint
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.teachers import open_teacher
from tsdfm.models.teachers.student import AdapterStudent, load_adapter_student
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


@pytest.fixture(scope="module")
def bert_dataset(tmp_path_factory, bert):
    """One committed K = 1 shard of the BERT teacher (S = 2), built without Ray."""
    root = tmp_path_factory.mktemp("data") / "bert"
    cfg = BuildConfig(
        str(bert),
        shards=1,
        trajectories_per_shard=ROWS,
        batch_size=ROWS,
        navigator=NavigatorConfig(S, N, 1),
    )
    prov = identify(cfg)
    manifest = Manifest.create(
        str(root), plan_of(cfg), prov.fingerprint, prov.tokenizer_identity, prov.teacher
    )
    res = ShardBuilder(cfg, str(root), planned=prov).build(0)
    manifest.record_shard(res.info, res.counters, res.stats)
    return root


def _inputs(ckpt, B=4):
    V, L = ckpt.config.vocab_size, ckpt.config.seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, L), generator=g)
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


def test_distill_refuses_a_remote_code_teacher_in_one_line(bert_dataset, tmp_path):
    mdlm = zoo.mdlm_like(tmp_path / "mdlm")
    run = tmp_path / "run"
    args = ["distill", "--data", bert_dataset, "--init", mdlm, "--out", run, "--steps", 1]
    res = runner.invoke(app, [str(a) for a in [*args, "--device", "cpu"]])
    assert res.exit_code != 0
    last = res.output.strip().splitlines()[-1]
    assert "is a mdlm teacher" in last and "masked-lm" in last, res.output
    assert not (run / "final").exists()
