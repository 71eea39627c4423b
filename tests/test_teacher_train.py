import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tsdfm.models.checkpoint import load_checkpoint
from tsdfm.models.data.synthetic import LanguageConfig
from tsdfm.models.errors import ConfigError
from tsdfm.models.train.teacher import TeacherTrainConfig, train_teacher

LANG = LanguageConfig(vocab_size=12, num_states=4, branching=3, smoothing=0.05, seq_len=8, seed=3)


def _cfg(out, **kw):
    base = dict(
        out=str(out),
        language=LANG,
        d_model=32,
        n_layers=2,
        n_heads=2,
        steps=8,
        batch_size=16,
        lr=3e-3,
        warmup=2,
        checkpoint_every=4,
        eval_every=4,
        seed=1,
    )
    base.update(kw)
    return TeacherTrainConfig(**base)


def test_tiny_overfit_lowers_the_loss(tmp_path):
    res = train_teacher(_cfg(tmp_path / "run", steps=120, eval_every=10, checkpoint_every=120))
    first, last = res.history[0]["heldout_loss"], res.history[-1]["heldout_loss"]
    # a uniform guess costs ln 12 = 2.48 nats; the language's posterior is far sharper
    assert last < first - 0.2 and last < math.log(12) - 0.5, (first, last)
    ck = load_checkpoint(res.final_dir)
    assert ck.identity == res.identity and ck.config.role == "teacher"
    assert ck.config.provenance["steps"] == 120
    assert (res.final_dir / "language.json").exists()


def test_resume_continues_exactly(tmp_path):
    full = train_teacher(_cfg(tmp_path / "full", eval_every=2))
    half = _cfg(tmp_path / "resumed", eval_every=2)

    # run the first half only: a run of 4 steps whose config we then extend is refused, so
    # interrupt by raising from the progress callback at step 7: the checkpoint is step 4's,
    # the metrics file already holds step 6's line, which the resumed run must not repeat
    class Stop(Exception):
        pass

    def stop_at_7(step, total, metrics):
        if step == 7:
            raise Stop

    with pytest.raises(Stop):
        train_teacher(half, progress=stop_at_7)
    resumed = train_teacher(half)
    assert resumed.identity == full.identity
    a = load_file(str(tmp_path / "full/checkpoints/step-0000008/trainer_state.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step-0000008/trainer_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [2, 4, 6, 8]


def test_the_run_ignores_and_keeps_the_global_rng(tmp_path):
    idents = []
    for global_seed in (0, 999):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        idents.append(train_teacher(_cfg(tmp_path / f"g{global_seed}", steps=4)).identity)
        assert torch.equal(torch.get_rng_state(), before)
    assert idents[0] == idents[1]


def test_biases_norm_gains_and_embeddings_are_not_decayed(tmp_path):
    from tsdfm.models.train.loop import param_groups

    train_teacher(_cfg(tmp_path / "run", steps=4))
    meta = json.loads((tmp_path / "run/checkpoints/step-0000004/trainer_state.json").read_text())
    saved = meta["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in saved] == [0.03, 0.0]
    model = load_checkpoint(tmp_path / "run/final").model
    groups = param_groups(model, 0.03)
    assert [len(g["params"]) for g in saved] == [len(g["params"]) for g in groups]
    name = {id(p): n for n, p in model.named_parameters()}
    decayed = {name[id(p)] for p in groups[0]["params"]}
    kept = {name[id(p)] for p in groups[1]["params"]}
    assert {"backbone.tok.weight", "backbone.cond_const"} <= kept
    assert kept - {"backbone.tok.weight", "backbone.cond_const"} == {
        n for n in name.values() if n.endswith(".bias")
    }
    assert decayed == {n for n in name.values() if n.endswith(".weight")} - kept


def test_changed_config_is_refused(tmp_path):
    train_teacher(_cfg(tmp_path / "run", steps=4))
    with pytest.raises(ConfigError, match=r"different config \(changed: lr\)"):
        train_teacher(_cfg(tmp_path / "run", steps=4, lr=1e-2))


def test_bad_training_configs(tmp_path):
    with pytest.raises(ConfigError, match="steps=0 must be a positive integer"):
        _cfg(tmp_path, steps=0)
    with pytest.raises(ConfigError, match="unknown loss 'mse'"):
        _cfg(tmp_path, loss="mse")


def test_corpus_teacher_trains_and_saves_its_tokenizer(tmp_path):
    from tsdfm.models.data.corpus import write_demo_corpus
    from tsdfm.models.data.sources import CorpusSource

    corpus_dir = write_demo_corpus(tmp_path / "corpus")
    data = CorpusSource.from_path(corpus_dir, seq_len=32, vocab_size=300)
    res = train_teacher(_cfg(tmp_path / "run", steps=4), data)
    ck = load_checkpoint(res.final_dir)
    assert ck.config.data["kind"] == "corpus"
    assert ck.config.special_tokens == {"eos": 0, "mask": data.vocab_size}
    text = "the river ran"
    assert ck.tokenizer.decode(ck.tokenizer.encode(text).ids) == text
