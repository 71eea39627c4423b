"""Tokenized text corpus: BPE tokenizer, windowing, split, batching, save/load and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tsdfm.models.data.corpus import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    CorpusConfig,
    TokenizedCorpus,
    encode_documents,
    load_texts,
    train_bpe_tokenizer,
    write_demo_corpus,
)
from tsdfm.models.data.synthetic import MASK_TOKEN
from tsdfm.models.errors import ConfigError, DataError

SEQ_LEN = 32


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_corpus(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def texts(demo_dir: Path) -> list[str]:
    return load_texts(demo_dir)


@pytest.fixture(scope="module")
def tok(texts: list[str]) -> Tokenizer:
    return train_bpe_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def corpus(demo_dir: Path, tok: Tokenizer) -> TokenizedCorpus:
    return TokenizedCorpus.from_path(demo_dir, tok, CorpusConfig(seq_len=SEQ_LEN))


def _indexed_corpus(tok: Tokenizer, n: int = 40) -> TokenizedCorpus:
    """A corpus whose window i starts with token i, so windows can be identified."""
    w = torch.arange(n * SEQ_LEN, dtype=torch.int64).reshape(n, SEQ_LEN) % 7 + 1
    w[:, 0] = torch.arange(n)
    return TokenizedCorpus(w, tok, CorpusConfig(seq_len=SEQ_LEN))


# ---------------------------------------------------------------------------- demo corpus
def test_demo_corpus_is_deterministic_and_small(tmp_path: Path) -> None:
    a = write_demo_corpus(tmp_path / "a")
    b = write_demo_corpus(tmp_path / "b")
    c = write_demo_corpus(tmp_path / "c", seed=1)
    names = sorted(p.name for p in a.iterdir())
    assert names == [f"doc_{i:03d}.txt" for i in range(8)]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names)
    total = sum((a / n).stat().st_size for n in names)
    assert 3_000 < total < 12_000
    doc = (a / "doc_000.txt").read_text()
    assert doc.count("\n\n") == 2  # 12 sentences, four to a paragraph
    assert doc.endswith(".\n")


def test_load_texts_reads_sorted_files_as_documents(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second doc\n")
    (tmp_path / "a.txt").write_text("first doc\n\nwith two paragraphs\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    assert load_texts(tmp_path) == ["first doc\n\nwith two paragraphs\n", "second doc\n", "third"]
    assert load_texts(tmp_path / "b.txt") == ["second doc\n"]


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_text_and_learns_merges(tok: Tokenizer, texts: list[str]) -> None:
    samples = [
        texts[0],
        "  Leading spaces,\ttabs and\n\nblank lines  ",
        "Unseen wörds: naïve café, 日本語, emoji 🙂 and digits 12345.",
        "",
    ]
    for s in samples:
        assert tok.decode(tok.encode(s).ids) == s
    # Merges compress the training text below one token per byte, more so with more merges.
    n_bytes = len(texts[0].encode())
    n_320 = len(tok.encode(texts[0]).ids)
    n_600 = len(train_bpe_tokenizer(texts, vocab_size=600).encode(texts[0]).ids)
    assert n_600 < n_320 < 0.7 * n_bytes


def test_special_token_ids(tok: Tokenizer, corpus: TokenizedCorpus) -> None:
    assert tok.get_vocab_size() == 321
    assert tok.token_to_id(EOS_TOKEN) == 0
    assert tok.token_to_id(MASK_TOKEN) == 320 == tok.get_vocab_size() - 1
    assert corpus.eos_token_id == 0
    assert corpus.vocab_size == 320
    assert corpus.mask_token_id == 320


def test_tokenizer_training_is_deterministic(texts: list[str], tok: Tokenizer) -> None:
    again = train_bpe_tokenizer(texts, vocab_size=320)
    assert again.to_str() == tok.to_str()


def test_small_corpus_gives_fewer_merges_and_mask_stays_last() -> None:
    t = train_bpe_tokenizer(["a tiny text, a tiny text"], vocab_size=5000)
    size = t.get_vocab_size()
    assert 258 < size < 300  # EOS + 256 bytes + a few merges + [MASK]
    assert t.token_to_id(MASK_TOKEN) == size - 1


def test_special_strings_in_text_are_plain_bytes(tok: Tokenizer) -> None:
    text = f"before {MASK_TOKEN} and {EOS_TOKEN} after"
    (ids,) = encode_documents(tok, [text])
    assert 0 not in ids and tok.token_to_id(MASK_TOKEN) not in ids
    assert tok.decode(ids) == text
    assert tok.encode_special_tokens is False  # restored after encoding


# ---------------------------------------------------------------------------- windows
def test_windows_are_the_eos_joined_stream(
    corpus: TokenizedCorpus, texts: list[str], tok: Tokenizer
) -> None:
    docs = encode_documents(tok, texts)
    stream = [i for d in docs for i in (*d, 0)]
    n = len(stream) // SEQ_LEN
    assert len(texts) == 8
    assert corpus.num_documents == 8
    assert corpus.num_stream_tokens == len(stream)
    assert len(corpus) == n > 50
    assert corpus.windows.shape == (n, SEQ_LEN)
    assert corpus.windows.dtype == torch.int64
    assert corpus.windows.flatten().tolist() == stream[: n * SEQ_LEN]
    # EOS appears exactly at document ends (those inside the kept prefix), nowhere else.
    ends, pos = [], -1
    for d in docs:
        pos += len(d) + 1
        ends.append(pos)
    eos_positions = (corpus.windows.flatten() == 0).nonzero().flatten().tolist()
    assert eos_positions == [e for e in ends if e < n * SEQ_LEN]
    assert len(eos_positions) >= 7
    assert int(corpus.windows.max()) < corpus.mask_token_id
    # The first window decodes to the start of the first document.
    assert texts[0].startswith(corpus.decode(corpus.windows[0]))


def test_max_windows_caps_the_corpus(texts: list[str], tok: Tokenizer, corpus) -> None:
    small = TokenizedCorpus.from_texts(texts, tok, CorpusConfig(seq_len=SEQ_LEN, max_windows=5))
    assert len(small) == 5
    assert torch.equal(small.windows, corpus.windows[:5])


# ---------------------------------------------------------------------------- split / batch
def test_split_is_deterministic_and_disjoint(tok: Tokenizer) -> None:
    c = _indexed_corpus(tok, n=40)
    train, held = c.split(0.25, seed=3)
    train2, held2 = c.split(0.25, seed=3)
    _, held_other = c.split(0.25, seed=4)
    assert (len(train), len(held)) == (30, 10)
    assert torch.equal(train.windows, train2.windows)
    assert torch.equal(held.windows, held2.windows)
    train_ids, held_ids = train.windows[:, 0].tolist(), held.windows[:, 0].tolist()
    assert set(train_ids).isdisjoint(held_ids)
    assert sorted(train_ids + held_ids) == list(range(40))
    assert train_ids == sorted(train_ids) and held_ids == sorted(held_ids)
    assert held_other.windows[:, 0].tolist() != held_ids
    assert train.vocab_size == held.vocab_size == c.vocab_size


def test_split_keeps_at_least_one_window_each_side(tok: Tokenizer) -> None:
    c = _indexed_corpus(tok, n=3)
    assert [len(p) for p in c.split(0.01, seed=0)] == [2, 1]
    assert [len(p) for p in c.split(0.99, seed=0)] == [1, 2]


def test_batch_uses_the_generator(corpus: TokenizedCorpus) -> None:
    a = corpus.batch(16, torch.Generator().manual_seed(0))
    b = corpus.batch(16, torch.Generator().manual_seed(0))
    c = corpus.batch(16, torch.Generator().manual_seed(1))
    assert a.shape == (16, SEQ_LEN) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    rows = {tuple(r) for r in corpus.windows.tolist()}
    assert all(tuple(r) in rows for r in a.tolist())
    # Consecutive draws from one generator advance it.
    g = torch.Generator().manual_seed(0)
    assert torch.equal(corpus.batch(16, g), a)
    assert not torch.equal(corpus.batch(16, g), a)


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip(corpus: TokenizedCorpus, tmp_path: Path) -> None:
    out = corpus.save(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == [
        "corpus.json",
        "tokenizer.json",
        "windows.safetensors",
    ]
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["num_windows"] == len(corpus)
    assert meta["seq_len"] == SEQ_LEN
    assert meta["vocab_size"] == 320 and meta["mask_token_id"] == 320
    assert meta["config"] == {"seq_len": SEQ_LEN, "max_windows": None}
    back = TokenizedCorpus.load(out)
    assert torch.equal(back.windows, corpus.windows)
    assert back.config == corpus.config
    assert (back.vocab_size, back.mask_token_id, back.eos_token_id) == (320, 320, 0)
    assert (back.num_documents, back.num_stream_tokens) == (8, corpus.num_stream_tokens)
    text = "The river rose after the spring rains."
    assert back.tokenizer.encode(text).ids == corpus.tokenizer.encode(text).ids


def test_load_rejects_inconsistent_or_missing_files(corpus: TokenizedCorpus, tmp_path) -> None:
    out = corpus.save(tmp_path / "saved")
    meta = json.loads((out / "corpus.json").read_text())
    meta["num_windows"] += 1
    (out / "corpus.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="inconsistent"):
        TokenizedCorpus.load(out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"has no tokenizer\.json"):
        TokenizedCorpus.load(out)
    with pytest.raises(DataError, match="does not exist"):
        TokenizedCorpus.load(tmp_path / "nowhere")
    bad = corpus.save(tmp_path / "bad")
    (bad / "windows.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="malformed"):
        TokenizedCorpus.load(bad)


# ---------------------------------------------------------------------------- bad input
def test_missing_path_and_empty_inputs(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match="does not exist") as e:
        load_texts(missing)
    assert str(missing) in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"contains no \.txt files"):
        load_texts(tmp_path / "empty")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n  ")
    with pytest.raises(DataError, match=r"contains no text \(1 file"):
        load_texts(tmp_path / "blank")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_texts(tmp_path / "latin1.txt")


def test_too_short_corpus_names_path_and_minimum(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(DataError) as e:
        TokenizedCorpus.from_path(tmp_path / "short.txt", tok, CorpusConfig(seq_len=64))
    msg = str(e.value)
    assert str(tmp_path / "short.txt") in msg
    assert "seq_len=64" in msg
    n = len(tok.encode("Too short.").ids) + 1
    assert f"has {n} tokens" in msg
    with pytest.raises(DataError, match="has no text"):
        TokenizedCorpus.from_texts(["", "  "], tok, CorpusConfig(seq_len=8), source="mem")


def test_bad_configs_and_arguments(texts: list[str], tok: Tokenizer) -> None:
    with pytest.raises(ConfigError, match=f"vocab_size must be >= {MIN_VOCAB_SIZE}.*got 100"):
        train_bpe_tokenizer(texts, vocab_size=100)
    with pytest.raises(DataError, match="no text"):
        train_bpe_tokenizer(["", " "], vocab_size=400)
    with pytest.raises(ConfigError, match="seq_len must be >= 2, got 1"):
        CorpusConfig(seq_len=1)
    with pytest.raises(ConfigError, match="max_windows"):
        CorpusConfig(seq_len=8, max_windows=0)
    c = _indexed_corpus(tok, n=4)
    with pytest.raises(ConfigError, match=r"holdout_fraction must be in \(0, 1\), got 0"):
        c.split(0.0, seed=0)
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        c.batch(0, torch.Generator())
    one = TokenizedCorpus(c.windows[:1], tok, c.config)
    with pytest.raises(DataError, match="splitting needs at least 2"):
        one.split(0.5, seed=0)


def test_rejects_bad_windows_and_tokenizers(tok: Tokenizer) -> None:
    cfg = CorpusConfig(seq_len=4)
    with pytest.raises(DataError, match=r"\[MASK\]=320 may not occur"):
        TokenizedCorpus(torch.tensor([[1, 2, 3, 320]]), tok, cfg)
    with pytest.raises(DataError, match="seq_len=4"):
        TokenizedCorpus(torch.ones(2, 5, dtype=torch.int64), tok, cfg)
    with pytest.raises(DataError, match="int64"):
        TokenizedCorpus(torch.ones(2, 4, dtype=torch.int32), tok, cfg)
    word = Tokenizer(models.WordLevel({"[MASK]": 0, "a": 1}, unk_token="[MASK]"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(DataError, match="build it with train_bpe_tokenizer"):
        TokenizedCorpus.from_texts(["a a a a"], word, cfg)
