"""`compass train` against a teacher of another family (issue 16).

The pooled (scalar) compass of a tiny random BERT masked LM, an MDLM-like and a Duo-like
remote-code teacher: trained by NCE on the teacher's own states and a corpus cut with the
teacher's own tokenizer into solver ids; it records the adapter teacher's identity, so the
build accepts it (K = 2, in process), and remote code runs only with --trust-remote-code.
"""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest
import teacher_zoo as zoo
import torch
from tokenizers import Tokenizer
from typer.testing import CliRunner

from tsdfm.models.checkpoint import load_checkpoint
from tsdfm.models.compass import check_compass_for_teacher
from tsdfm.models.data.schema import decode_rows
from tsdfm.models.data.sources import default_data_source
from tsdfm.models.errors import DataError
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.models.teachers import open_teacher, teacher_files
from tsdfm.pipeline.cli import app
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.worker import ShardBuilder, identify

runner = CliRunner()
S, N = 2, 8  # student steps, teacher steps


def _corpus(path, unknown: str | None = None):
    """Lines of the zoo's words (and ``unknown``, a word no zoo tokenizer knows)."""
    rng = random.Random(0)
    words = zoo.WORDS + ([unknown] if unknown else [])
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(30)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(teacher, corpus, out, *extra):
    args = ["compass", "train", "--teacher", teacher, "--corpus", corpus, "--out", out]
    args += ["--train-steps", 3, "--batch-size", 4, "--warmup", 1, "--teacher-steps", N]
    args += ["--bank-trajectories", 4, "--records-per-trajectory", 2, "--refresh-every", 2]
    args += ["--heldout-trajectories", 2, "--checkpoint-every", 2, "--eval-every", 2]
    args += ["--d-model", 16, "--n-layers", 1, "--n-heads", 2, "--device", "cpu", *extra]
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bert_compass(tmp_path_factory):
    """(BERT teacher dir, corpus, trained compass dir)."""
    root = tmp_path_factory.mktemp("bert-compass")
    teacher = zoo.bert(root / "bert")
    corpus = _corpus(root / "corpus.txt", unknown="zzz")
    res = _train(teacher, corpus, root / "run")
    assert res.exit_code == 0, res.output
    return teacher, corpus, root / "run" / "final"


def test_the_corpus_is_cut_with_the_teachers_tokenizer_in_solver_ids(bert_compass):
    teacher, corpus, _ = bert_compass
    ckpt = open_teacher(teacher)
    data = default_data_source(ckpt, corpus)
    # expected: the teacher's own tokenizer.json, [UNK] (the unknown word) dropped, then
    # BERT's mask id 7 removed from the ids (ids above it move down by one)
    tok = Tokenizer.from_file(str(teacher / "tokenizer.json"))
    unk, mask = tok.token_to_id("[UNK]"), tok.token_to_id("[MASK]")
    assert (unk, mask) == (1, 7)
    ids = [i for line in corpus.read_text().splitlines() for i in tok.encode(line).ids]
    assert unk in ids  # the corpus holds an unknown word
    stream = torch.tensor([i - (i > mask) for i in ids if i != unk])
    L = ckpt.config.seq_len
    n = len(stream) // L
    windows = data.corpus.windows
    assert data.vocab_size == ckpt.config.vocab_size == 16 and data.seq_len == L
    assert torch.equal(windows, stream[: n * L].reshape(n, L))
    assert len(data.train) + len(data.held) == n
    # only tokens the teacher draws: the never-drawn ones are the four specials
    never = set(ckpt.tokenizer.vocab.never_internal())
    assert never == {0, 1, 2, 3}
    assert not set(windows.unique().tolist()) & never
    assert data.describe()["eos_token_id"] is None


def test_a_compass_of_a_bert_teacher_loads_and_names_the_teacher(bert_compass):
    teacher, _, final = bert_compass
    compass = load_checkpoint(final, role="compass")
    ckpt = open_teacher(teacher)
    identity = teacher_files(teacher).identity
    assert ckpt.identity == identity
    prov = compass.config.provenance
    assert prov["teacher_identity"] == identity
    assert prov["teacher"] == str(teacher)
    assert prov["negatives"]["teacher_identity"] == identity
    assert prov["steps"] == 3
    # it reads the teacher's solver states: V data tokens, [MASK] = V
    assert compass.config.vocab_size == ckpt.config.vocab_size
    assert compass.tokenizer.get_vocab_size() == ckpt.config.vocab_size + 1
    assert compass.tokenizer.token_to_id("[MASK]") == ckpt.config.vocab_size
    assert compass.tokenizer.id_to_token(5) == ckpt.tokenizer.id_to_token(5) == "w1"
    check_compass_for_teacher(compass, ckpt)  # raises if it does not fit or learned elsewhere


def test_a_k2_build_with_the_trained_compass_writes_a_shard(bert_compass, tmp_path):
    teacher, _, final = bert_compass
    cfg = BuildConfig(
        str(teacher),
        compass=str(final),
        shards=1,
        trajectories_per_shard=2,
        batch_size=2,
        navigator=NavigatorConfig(S, N, 2),
    )
    planned = identify(cfg)  # the driver's checks: the compass learned from this teacher
    info = ShardBuilder(cfg, str(tmp_path), planned=planned).build(0).info
    rows = decode_rows(pq.read_table(tmp_path / info.path))
    states = torch.as_tensor(rows.states)
    assert states.shape == (2, S + 1, zoo.SEQ_LEN)
    x_1 = states[:, -1].long()
    assert x_1.max() < 16 and not torch.isin(x_1, torch.tensor([0, 1, 2, 3])).any()


def _one_line_refusal(res, *needles):
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("maker", ["mdlm_like", "duo_like"])
def test_remote_code_only_with_the_flag_and_a_corpus_is_needed(tmp_path, maker):
    teacher = getattr(zoo, maker)(tmp_path / maker)
    corpus = _corpus(tmp_path / "corpus.txt")
    _one_line_refusal(_train(teacher, corpus, tmp_path / "no"), "--trust-remote-code")
    assert not (tmp_path / "no" / "final").exists()
    no_corpus = ["compass", "train", "--teacher", str(teacher), "--out", str(tmp_path / "nc")]
    res = runner.invoke(app, [*no_corpus, "--trust-remote-code", "--device", "cpu"])
    _one_line_refusal(res, "--corpus")
    with pytest.raises(DataError, match="--corpus"):
        default_data_source(open_teacher(teacher, trust_remote_code=True))
    res = _train(teacher, corpus, tmp_path / "run", "--trust-remote-code")
    assert res.exit_code == 0, res.output
    compass = load_checkpoint(tmp_path / "run" / "final", role="compass")
    ckpt = open_teacher(teacher, trust_remote_code=True)
    assert compass.config.provenance["teacher_identity"] == ckpt.identity
    assert (
        compass.config.source
        == ckpt.config.source
        == ("mask" if maker == "mdlm_like" else "uniform")
    )
    check_compass_for_teacher(compass, ckpt)


def test_the_token_ratio_compass_of_an_adapter_teacher_is_refused(bert_compass, tmp_path):
    teacher, corpus, _ = bert_compass
    res = _train(teacher, corpus, tmp_path / "t", "--head", "tokens", "--reveal-order", "dilated")
    _one_line_refusal(res, "--head scalar")
